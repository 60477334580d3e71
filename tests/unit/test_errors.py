from pathlib import Path

from vmkeep import errors


def test_message_from_docstring_template() -> None:
    e = errors.WrongState("web", "QUIESCED", "quiesce", "RUNNING")
    assert str(e) == "VM web is QUIESCED; quiesce needs RUNNING."
    assert e.exit_code == 4 and e.http_status == 409


def test_exit_codes_are_unique_per_leaf_family() -> None:
    codes: dict[int, str] = {}
    for cls in errors.all_error_classes():
        parent = cls.__mro__[1]
        if getattr(parent, "exit_code", None) == cls.exit_code and parent is not errors.VmkeepError:
            continue  # a subclass that shares its parent's code (NotFound family)
        assert cls.exit_code not in codes, f"{cls.__name__} reuses {codes.get(cls.exit_code)}"
        codes[cls.exit_code] = cls.__name__
    assert not {0, 1, 130} & set(codes)


def test_docs_table_matches_code() -> None:
    doc = Path(__file__).parents[2] / "docs" / "exit-codes.md"
    assert errors.exit_code_table() in doc.read_text(), (
        "regenerate: python scripts/regen_exit_codes.py"
    )
