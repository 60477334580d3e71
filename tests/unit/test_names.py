"""One name rule for every name a user gives (they become paths and libvirt names)."""

from __future__ import annotations

import pytest

from vmkeep.errors import InvalidValue
from vmkeep.names import check_name


@pytest.mark.parametrize("name", ["web", "db-1", "a.b_c+d", "x" * 64, "1a", "vm.2"])
def test_good_names(name: str) -> None:
    assert check_name("name", name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "12345", "a/b", "../x", "-x", ".hidden", "a b", "x" * 65, "é", "a\n"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidValue) as exc:
        check_name("--name", name)
    assert "--name" in str(exc.value) and "letters, digits" in str(exc.value)
    assert exc.value.exit_code == 9


def test_long_name_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidValue) as exc:
        check_name("--name", "y" * 300)
    assert len(str(exc.value)) < 300


def test_only_ascii_digits_within_64_bits_are_ids() -> None:
    from vmkeep.names import is_id

    assert is_id("12") and is_id(str(2**63 - 1))
    assert not is_id(str(2**63)) and not is_id("²") and not is_id("web1") and not is_id("")
