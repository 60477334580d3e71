import pytest

from vmkeep.engine.core.backup_config import resolve, validate
from vmkeep.errors import InvalidValue
from vmkeep.model import BackupMode, FsFreeze


def test_inheritance_vm_over_pool_over_global() -> None:
    cfg = resolve({"mode": "increment"}, {"keep_last": 3, "mode": "full"}, {"fs_freeze": "agent"})
    assert cfg.mode == BackupMode.INCREMENT
    assert cfg.keep_last == 3
    assert cfg.fs_freeze == FsFreeze.AGENT
    assert cfg.backup_volatile is False


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("keep_last", "0", "whole number"),
        ("fs_freeze", "qemu", "none, agent or suspend"),
        ("mode", "diff", "full or increment"),
        ("backup_volatile", "maybe", "yes or no"),
    ],
)
def test_bad_values_name_key_and_fix(key: str, value: str, hint: str) -> None:
    with pytest.raises(InvalidValue) as e:
        validate(key, value)
    assert key in str(e.value) and value in str(e.value) and hint in str(e.value)
