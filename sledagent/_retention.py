"""Retention: the cleanup context, its validation, and which bundles go first. Pure.

Semantics are omicron's (``zone_bundle.rs``): a bundle's priority is read along each
dimension of ``priority`` in order (``cause`` ranks other < unexpected_zone <
terminated_instance; ``time`` ranks older lower); cleanup deletes the lowest-priority
bundles of a debug directory until its usage is within ``storage_limit`` percent of its
quota. Beyond omicron, files in the directory that are not whole bundles (quarantined,
``_quarantine``) are counted and go first. Unlike omicron, updates are validated as a
whole (a clear error naming the field) and the context is persisted by the store, so it
survives a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ._errors import BadRequest
from ._host import BundleInfo
from ._wire import (
    CleanupContext,
    CleanupContextUpdate,
    Duration,
    PriorityDimension,
    QuarantinedFile,
)

PERIOD_MIN_S = 60
PERIOD_MAX_S = 86_400
STORAGE_LIMIT_MIN = 1
STORAGE_LIMIT_MAX = 50

DEFAULT_CONTEXT = CleanupContext(
    period=Duration(secs=600, nanos=0),
    priority=[PriorityDimension.CAUSE, PriorityDimension.TIME],
    storage_limit=25,
)


def validate_context(ctx: CleanupContext) -> CleanupContext:
    """Return ``ctx`` if every field is in range; ``BadRequest`` naming the field."""
    seconds = ctx.period.seconds
    if not PERIOD_MIN_S <= seconds <= PERIOD_MAX_S:
        raise BadRequest(
            f"`period` must be between {PERIOD_MIN_S} s and {PERIOD_MAX_S} s, got {seconds:g} s"
        )
    if not STORAGE_LIMIT_MIN <= ctx.storage_limit <= STORAGE_LIMIT_MAX:
        raise BadRequest(
            f"`storage_limit` must be between {STORAGE_LIMIT_MIN} and {STORAGE_LIMIT_MAX} "
            f"percent, got {ctx.storage_limit}"
        )
    if sorted(ctx.priority) != sorted(PriorityDimension):
        raise BadRequest(
            "`priority` must name each of "
            f"{sorted(d.value for d in PriorityDimension)} exactly once, "
            f"got {[d.value for d in ctx.priority]}"
        )
    return ctx


def apply_update(current: CleanupContext, update: CleanupContextUpdate) -> CleanupContext:
    """The context after ``update`` (absent fields unchanged), validated as a whole."""
    return validate_context(
        CleanupContext(
            period=update.period if update.period is not None else current.period,
            priority=list(update.priority) if update.priority is not None else current.priority,
            storage_limit=(
                update.storage_limit if update.storage_limit is not None else current.storage_limit
            ),
        )
    )


def priority_key(bundle: BundleInfo, priority: Sequence[PriorityDimension]) -> tuple[object, ...]:
    """Sort key: ascending order is lowest priority (deleted first) to highest."""
    keys: list[object] = []
    for dim in priority:
        if dim is PriorityDimension.CAUSE:
            keys.append(bundle.metadata.cause.rank)
        else:
            keys.append(bundle.metadata.time_created)
    keys.append(str(bundle.bundle_id))  # a total order, so cleanup is deterministic
    return tuple(keys)


@attrs.frozen
class CleanupPlan:
    delete: tuple[BundleInfo, ...]
    bytes_freed: int  # bundles' and quarantined files' bytes
    quarantined: tuple[QuarantinedFile, ...] = ()


def plan_cleanup(
    bundles: Iterable[BundleInfo],
    *,
    bytes_available: int,
    priority: Sequence[PriorityDimension],
    quarantined: Iterable[QuarantinedFile] = (),
    bytes_used: int | None = None,
) -> CleanupPlan:
    """What to delete so that the directory fits in ``bytes_available``: quarantined
    files first (oldest first: they are not bundles), then bundles in priority order.

    ``bytes_used`` is the directory's whole usage, files cleanup cannot remove included
    (a bundle being written); by default the bundles' and quarantined files' sum."""
    files = sorted(quarantined, key=lambda q: (q.time_quarantined, q.path))
    ordered = sorted(bundles, key=lambda b: priority_key(b, priority))
    used = bytes_used
    if used is None:
        used = sum(b.size for b in ordered) + sum(q.bytes for q in files)
    chosen_files: list[QuarantinedFile] = []
    for q in files:
        if used <= bytes_available:
            break
        chosen_files.append(q)
        used -= q.bytes
    chosen: list[BundleInfo] = []
    for bundle in ordered:
        if used <= bytes_available:
            break
        chosen.append(bundle)
        used -= bundle.size
    freed = sum(b.size for b in chosen) + sum(q.bytes for q in chosen_files)
    return CleanupPlan(tuple(chosen), freed, tuple(chosen_files))


def bytes_available(quota: int, storage_limit: int) -> int:
    """``dataset_quota`` x ``storage_limit`` / 100 (omicron's rule)."""
    return quota * storage_limit // 100
