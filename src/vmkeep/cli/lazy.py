"""A click group whose subcommands are imported only when used (click's "lazily loading
subcommands"): a command that does not need a family does not pay for its imports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click


def resolve(ref: str) -> Any:
    """``"package.module:attr"``, imported now."""
    module, attr = ref.split(":")
    # __import__, not importlib.import_module: -X importtime reports only the former
    return getattr(__import__(module, fromlist=[attr]), attr)


class LazyGroup(click.Group):
    """``lazy_subcommands`` maps a subcommand name to ``"module:attr"``: a click command, or a
    mapping of commands by name (one module that builds several)."""

    def __init__(self, *args: Any, lazy_subcommands: Mapping[str, str] = {}, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_subcommands:
            found = resolve(self.lazy_subcommands[name])
            cmd: click.Command = found[name] if isinstance(found, Mapping) else found
            return cmd
        return super().get_command(ctx, name)
