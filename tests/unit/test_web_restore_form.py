"""The restore wizard's form is the restore action's params model: every param is an input of
some kind (none forgotten, none invented), a kind's own flags are set by it, and bad input is
refused naming the CLI's option."""

from __future__ import annotations

import pytest

from vmkeep.engine.service import params as P
from vmkeep.errors import InvalidValue
from vmkeep.web import restore_form as F


def test_every_param_of_the_model_is_an_input_of_some_kind() -> None:
    shown = {f.name for k in F.KINDS.values() for f in F.form_fields(k)}
    set_by_kinds = {name for k in F.KINDS.values() for name in k.fixed}
    assert shown | set_by_kinds | set(F.STEPS) == set(P.RestoreParams.model_fields)


def test_inputs_take_type_and_bounds_from_the_model() -> None:
    fields = {f.name: f for f in F.form_fields(F.KINDS["instant"])}
    assert fields["no_nic"].input == "checkbox" and fields["no_nic"].option == "--no-nic"
    bw = fields["copy_bwlimit"]
    assert (bw.input, bw.minimum, bw.maximum) == ("number", 0, 1 << 20)
    assert fields["path"].maxlength == 4096
    assert "disk" not in fields and "in_place" not in fields  # the engine refuses them there
    disk = {f.name: f for f in F.form_fields(F.KINDS["disk"], ("vda", "vdb"))}["disk"]
    assert (disk.input, disk.required, disk.choices) == ("select", True, ("vda", "vdb"))


def test_a_kind_sets_its_own_flags_and_empty_inputs_are_left_out() -> None:
    p = F.params_from_form(F.KINDS["in-place"], 4, 0, {"start": "on", "disk": "", "csrf": "x"})
    assert isinstance(p, P.RestoreParams)
    assert (p.backup, p.increment, p.in_place, p.start, p.disk) == (4, 0, True, True, None)
    p = F.params_from_form(F.KINDS["new"], 4, None, {"name": " web2 ", "no_nic": "on"})
    assert (p.name, p.no_nic, p.in_place, p.instant, p.increment) == (
        "web2",
        True,
        False,
        False,
        None,
    )
    # a param the kind leaves out is not taken from the form, even when sent
    assert F.params_from_form(F.KINDS["new"], 4, None, {"in_place": "on"}).in_place is False


@pytest.mark.parametrize(
    ("kind", "form", "said"),
    [
        ("disk", {"disk": "vda"}, "--path"),
        ("instant", {"copy_bwlimit": "fast"}, "--copy-bwlimit"),
        ("instant", {"copy_bwlimit": "-1"}, "--copy-bwlimit"),
        ("disk", {"path": "/var/lib/vmkeep/restores/vda.qcow2"}, "--disk"),
    ],
)
def test_bad_input_names_the_option(kind: str, form: dict[str, str], said: str) -> None:
    with pytest.raises(InvalidValue, match=said):
        F.params_from_form(F.KINDS[kind], 4, None, form)
