"""The restore wizard's form, read off the restore action's params model (``params.
RestoreParams``): one field per param, its input type and bounds from the model, its label the
CLI's option (``--no-nic``), so the page has no second list of options. A restore ``Kind`` only
says which params it sets itself and which it leaves out (those the engine refuses with it:
``engine/restore/inplace.run_restore``)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

from vmkeep.engine.service import actions
from vmkeep.engine.service import params as P
from vmkeep.errors import InvalidValue

ACTION = actions.ACTIONS["restore"]
STEPS = ("backup", "increment")  # chosen in steps 1 and 2, not in the form


@dataclass(frozen=True)
class Kind:
    key: str
    title: str
    explain: str
    fixed: Mapping[str, Any] = field(default_factory=dict)  # params this kind sets itself
    left_out: frozenset[str] = frozenset()  # params the engine refuses with this kind
    required: frozenset[str] = frozenset()


_MODES = frozenset({"in_place", "instant"})
KINDS = {
    k.key: k
    for k in (
        Kind("new", "As a new VM", "A new VM next to the original, with its own name and disks.",
             left_out=_MODES | {"disk", "copy_bwlimit"}),
        Kind("in-place", "In place", "Roll the VM itself back to this point (it must be powered "
             "off; its name, UUID and NICs stay).", {"in_place": True},
             _MODES | {"name", "path", "force", "no_nic", "no_ip", "copy_bwlimit"}),
        Kind("instant", "Instant", "Run the VM at once on overlays over the backup, then copy "
             "its disks in the background.", {"instant": True}, _MODES | {"disk"}),
        Kind("disk", "One disk", "Write one disk of the point to an image file.",
             left_out=_MODES | {"name", "no_nic", "no_ip", "start", "copy_bwlimit",
                                "without_memory"},
             required=frozenset({"disk", "path"})),
        Kind("files", "Files", "Browse the point's files and download the ones you need."),
    )
}  # fmt: skip


@dataclass(frozen=True)
class FormField:
    name: str  # the params field
    option: str  # the CLI's option it stands for
    input: str  # "checkbox", "number", "text", "select"
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    maxlength: int | None = None
    choices: tuple[str, ...] = ()


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _bound(info: Any, attr: str) -> int | None:
    for m in info.metadata:
        if hasattr(m, attr):
            return int(getattr(m, attr))
    return None


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def form_fields(kind: Kind, disks: tuple[str, ...] = ()) -> list[FormField]:
    """The inputs of step 3 for ``kind``, in the model's order (``disks``: the point's, the
    choices of ``--disk``)."""
    if kind.key == "files":
        return []
    out = []
    for name, info in P.RestoreParams.model_fields.items():
        if name in STEPS or name in kind.fixed or name in kind.left_out:
            continue
        base = _base_type(info.annotation)
        required = name in kind.required
        if base is bool:
            out.append(FormField(name, option(name), "checkbox"))
        elif base is int:
            out.append(FormField(name, option(name), "number", required,
                                 _bound(info, "ge"), _bound(info, "le")))  # fmt: skip
        elif name == "disk" and disks:
            out.append(FormField(name, option(name), "select", required, choices=disks))
        else:
            out.append(FormField(name, option(name), "text", required,
                                 maxlength=_bound(info, "max_length")))  # fmt: skip
    return out


def params_from_form(
    kind: Kind, backup: int, increment: int | None, form: Mapping[str, str]
) -> P.Params:
    """The restore's params from the submitted form: a checkbox is true when sent, an empty
    input is left out; bad input is InvalidValue naming the CLI's option."""
    data: dict[str, Any] = {"backup": backup, **kind.fixed}
    if increment is not None:
        data["increment"] = increment
    for f in form_fields(kind):
        sent = form.get(f.name, "")
        if f.input == "checkbox":
            if sent:
                data[f.name] = True
            continue
        sent = sent.strip()
        if not sent:
            if f.required:
                raise InvalidValue(f.option, "", f"a restore {kind.title.lower()} needs it")
            continue
        if f.input == "number":
            try:
                data[f.name] = int(sent)
            except ValueError:
                raise InvalidValue(f.option, sent, "a whole number") from None
        else:
            data[f.name] = sent
    return actions.parse(ACTION, data, options=True)
