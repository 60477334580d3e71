"""Checkpoints follow a migrating domain (both VMM drivers' ``migrate``, the fake's too).

libvirt moves the domain but not its checkpoint metadata: the destination starts with none, and
the source's goes with its definition. The dirty bitmaps themselves live in the qcow2 images and
do travel: on storage both hosts see, the source QEMU stores its persistent bitmaps in the image
when it hands it over and the destination's loads them; with ``--copy-storage`` libvirt migrates
them with the disks. So the metadata is read before, and defined again on the destination, in
order (parents first), with libvirt's REDEFINE, which on a running domain also checks that each
bitmap is there. Some libvirt versions refuse to migrate a domain that has checkpoints: then
only the metadata is dropped on the source first (the bitmaps stay in the images) and put back
there if the migration fails.

What cannot follow is said in ``Migration.chain_break``, a sentence the engine puts in its
warning ("the backup chain restarts because ...").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class CheckpointSide(Protocol):
    """One host's view of the domain's checkpoints."""

    where: str  # the host's URI, for messages

    def read(self) -> list[tuple[str, str]]:
        """(name, XML) of every checkpoint, parents before children."""
        ...

    def drop_metadata(self, name: str) -> None:
        """Forget the checkpoint; its bitmaps stay in the images."""
        ...

    def redefine(self, xml: str) -> None:
        """Define the checkpoint again from its XML (raises with the hypervisor's reason)."""
        ...


def parent_of(xml: str) -> str | None:
    try:
        return ET.fromstring(xml).findtext("parent/name") or None
    except ET.ParseError:
        return None


def ordered(checkpoints: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Parents before children (libvirt's topological order, kept when it is one already)."""
    names = {n for n, _ in checkpoints}
    done: set[str] = set()
    out: list[tuple[str, str]] = []
    pending = list(checkpoints)
    while pending:
        rest = []
        for name, xml in pending:
            parent = parent_of(xml)
            if parent is None or parent not in names or parent in done:
                out.append((name, xml))
                done.add(name)
            else:
                rest.append((name, xml))
        if len(rest) == len(pending):  # a loop in the parents: keep the given order
            out.extend(rest)
            break
        pending = rest
    return out


def migrate_with_checkpoints(
    source: CheckpointSide,
    migrate: Callable[[], T],
    refused_for_checkpoints: Callable[[BaseException], bool],
) -> tuple[T, list[tuple[str, str]]]:
    """Run ``migrate``; when libvirt refuses because of the checkpoints, drop their metadata on
    the source (children first), migrate again, and define them there again if it fails.
    Returns what ``migrate`` returned and the checkpoints to define on the destination."""
    saved = ordered(source.read())
    try:
        return migrate(), saved
    except BaseException as err:
        if not saved or not refused_for_checkpoints(err):
            raise
    try:  # an interrupt between two drops puts the dropped ones back too
        for name, _xml in reversed(saved):
            source.drop_metadata(name)
        return migrate(), saved
    except BaseException:
        restore(source, saved)
        raise


def restore(side: CheckpointSide, saved: list[tuple[str, str]]) -> None:
    """Put checkpoints back after a failed migration (best effort: every one is tried)."""
    try:
        present = {n for n, _ in side.read()}
    except Exception:  # noqa: BLE001 (cannot tell: each is tried; the migration's error stands)
        present = set()
    for name, xml in saved:
        if name not in present:
            try:
                side.redefine(xml)
            except Exception:  # noqa: BLE001 (the migration's own error is what is raised)
                continue


def redefine_all(dest: CheckpointSide, saved: list[tuple[str, str]]) -> tuple[tuple[str, ...], str]:
    """Define the saved checkpoints on the destination in order; (names defined, why the rest
    could not be, "" when all were). A checkpoint whose parent failed is not tried."""
    done: list[str] = []
    for name, xml in saved:
        try:
            dest.redefine(xml)
        except Exception as err:  # noqa: BLE001 (the reason is reported, never lost)
            left = len(saved) - len(done)
            return tuple(done), (
                f"checkpoint {name} ({left} of {len(saved)} not carried) could not be defined "
                f"on {dest.where} after the migration: {err}"
            )
        done.append(name)
    return tuple(done), ""
