"""Slots on disk: each installed bundle lives in its own folder under ``<data>/slots``.

The active bundle's slot is never touched by an install; a new bundle goes into
a fresh (inactive) slot, and a rollback re-activates a kept one. Retention is a
pure decision (``plan_retention``) applied by a thin deleter.
"""

from __future__ import annotations

__all__ = ["RetentionPlan", "apply_retention", "drop_stale_bases", "free_bytes", "install_into_slot", "plan_retention",
           "slot_name"]

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeship.ota.atomicfile import fsync_dir
from edgeship.ota.delivery import BASE_BUNDLE_NAME

from .persistence import InstalledBundle

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slot_name(name: str, version: str, update_id: str) -> str:
    """A folder name unique to one update of one bundle version (safe characters only)."""
    return _UNSAFE.sub("_", f"{name}-{version}-{update_id}")[:200]


def install_into_slot(staged: Path, slots_dir: Path, slot: str) -> Path:
    """Move the verified, extracted ``staged`` folder into ``slots_dir/slot``.

    Idempotent (a restart may run it again): if the slot exists and ``staged``
    does not, the move already happened.
    """
    slots_dir.mkdir(parents=True, exist_ok=True)
    target = slots_dir / slot
    if target.exists() and not staged.exists():
        return target
    if target.exists():  # a half-finished earlier attempt: the staged copy is the verified one
        shutil.rmtree(target)
    os.replace(staged, target)
    fsync_dir(slots_dir)
    return target


@dataclass(frozen=True)
class RetentionPlan:
    keep_previous: tuple[InstalledBundle, ...]
    delete: tuple[str, ...]   # slot folder names


def plan_retention(
    active: InstalledBundle | None,
    previous: Sequence[InstalledBundle],
    keep: int,
    on_disk: Iterable[str],
    protected: Iterable[str] = (),
) -> RetentionPlan:
    """Keep the active slot, the ``keep`` most recent previous ones and ``protected``
    slots (an update in progress); delete every other slot folder (failed installs,
    older bundles, leftovers)."""
    kept = tuple(previous[:keep])
    keep_slots = {b.slot for b in kept} | set(protected)
    if active is not None:
        keep_slots.add(active.slot)
    delete = tuple(sorted(s for s in on_disk if s not in keep_slots))
    return RetentionPlan(keep_previous=kept, delete=delete)


def apply_retention(slots_dir: Path, plan: RetentionPlan) -> None:
    for slot in plan.delete:
        path = slots_dir / slot
        if path.is_dir() and path.parent == slots_dir:
            shutil.rmtree(path, ignore_errors=True)
    if plan.delete:
        fsync_dir(slots_dir)


def drop_stale_bases(slots_dir: Path, keep: Iterable[str], protected: Iterable[str] = ()) -> list[str]:
    """Delete the kept bundle file (a delta base) of every slot but ``keep`` and ``protected``:
    only the active slot's bundle is a base the next update asks a delta from; a kept slot keeps
    its extracted files for rollback, not a second copy of them. Returns the slots cleared."""
    spare = set(keep) | set(protected)
    cleared = []
    if not slots_dir.is_dir():
        return cleared
    for slot in sorted(p for p in slots_dir.iterdir() if p.is_dir() and p.name not in spare):
        base = slot / BASE_BUNDLE_NAME
        if base.is_file():
            base.unlink(missing_ok=True)
            cleared.append(slot.name)
    return cleared


def free_bytes(folder: Path) -> int:
    """Free bytes available to this (unprivileged) process on ``folder``'s filesystem."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize
