"""DiskBundleStore: the bundles in the debug directories, indexed in memory.

The files are the truth: at startup the index is rebuilt by reading each bundle's
``metadata.toml`` (the first member, so only the start of each file is decompressed); a
corrupt bundle is reported and skipped. Afterwards listing never opens a bundle, and no
operation waits for a bundle being written (they are added when complete).

Retention (``_retention``): utilization and cleanup are per debug directory, as in
omicron; the cleanup context is validated, persisted next to the data (omicron loses it on
restart) and takes effect at once, including on the period of the running cleanup task.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path

import attrs
import msgspec
import structlog
import trio
from trio_util import AsyncValue

from ._archive import BUNDLE_SUFFIX
from ._codec import convert
from ._host import BundleInfo
from ._retention import DEFAULT_CONTEXT, apply_update, bytes_available, plan_cleanup
from ._retention import validate_context as _validate
from ._store import BundleIndex, MemoryBundleStore
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    ZoneBundleMetadata,
)

log = structlog.get_logger("sledagent.store")


def read_bundle_metadata(path: Path) -> ZoneBundleMetadata:
    """Read ``metadata.toml`` from a bundle; raises ``ValueError`` if it is not valid."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.next()
            if member is None or member.name != "metadata.toml":
                raise ValueError("first entry is not metadata.toml")
            f = tar.extractfile(member)
            if f is None:
                raise ValueError("metadata.toml is not a file")
            doc = tomllib.loads(f.read().decode())
    except (OSError, tarfile.TarError, EOFError, tomllib.TOMLDecodeError, UnicodeError) as exc:
        raise ValueError(f"unreadable bundle: {exc}") from exc
    try:
        return msgspec.convert(doc, ZoneBundleMetadata, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid metadata.toml: {exc}") from exc


class DiskBundleStore(MemoryBundleStore):
    """The index-backed store of ``_store``, whose bundles are files in debug dirs."""

    def __init__(
        self,
        debug_dirs: Sequence[Path],
        *,
        context_path: Path,
        quota_bytes: int | None = None,
    ) -> None:
        if not debug_dirs:
            raise ValueError("DiskBundleStore needs at least one debug directory")
        self.debug_dirs = [Path(d) for d in debug_dirs]
        self.context_path = Path(context_path)
        self.quota_bytes = quota_bytes
        super().__init__()
        self.skipped: list[tuple[str, str]] = []  # (path, why) of unreadable bundles
        #: How many periodic cleanups have run (lets a caller wait for the next one).
        self.cleanup_runs = AsyncValue(0)

    # --- startup ----------------------------------------------------------------------

    async def open(self) -> None:
        """Rebuild the index from the files and load the persisted context."""
        index, skipped = await trio.to_thread.run_sync(self._scan)
        self.index, self.skipped = index, skipped
        for path, why in skipped:
            log.error("bundle_skipped", path=path, reason=why)
        self.context.value = await trio.to_thread.run_sync(self._load_context)

    def _scan(self) -> tuple[BundleIndex, list[tuple[str, str]]]:
        index, skipped = BundleIndex(), []
        for debug_dir in self.debug_dirs:
            for path in sorted(debug_dir.glob(f"*/*{BUNDLE_SUFFIX}")):
                if path.name.startswith("."):
                    continue
                try:
                    meta = read_bundle_metadata(path)
                    if path.parent.name != meta.id.zone_name:
                        raise ValueError("zone_name does not match the directory")
                except ValueError as exc:
                    skipped.append((str(path), str(exc)))
                    continue
                known = index.get(meta.id.zone_name, meta.id.bundle_id)
                if known is None:
                    index.add(BundleInfo(meta, path.stat().st_size, (str(path),)))
                else:
                    index.add(attrs.evolve(known, paths=(*known.paths, str(path))))
        return index, skipped

    def _load_context(self) -> CleanupContext:
        try:
            doc = tomllib.loads(self.context_path.read_text())
            return _validate(convert(doc, CleanupContext))
        except FileNotFoundError:
            return DEFAULT_CONTEXT
        except Exception as exc:  # a bad file must not stop the agent
            log.error("cleanup_context_unreadable", path=str(self.context_path), error=str(exc))
            return DEFAULT_CONTEXT

    # --- BundleStore --------------------------------------------------------------------

    async def delete(self, zone_name: str, bundle_id: uuid.UUID) -> bool:
        info = self.index.remove(zone_name, bundle_id)
        if info is None:
            return False
        await trio.to_thread.run_sync(_unlink_all, info.paths)
        return True

    # --- retention ----------------------------------------------------------------------

    def _in_dir(self, debug_dir: Path) -> list[BundleInfo]:
        prefix = str(debug_dir) + os.sep
        out = []
        for b in self.index.list_all():
            mine = tuple(p for p in b.paths if p.startswith(prefix))
            if mine:
                out.append(attrs.evolve(b, paths=mine))
        return out

    def _quota(self, debug_dir: Path) -> int:
        if self.quota_bytes is not None:
            return self.quota_bytes
        return shutil.disk_usage(debug_dir if debug_dir.exists() else debug_dir.parent).total

    async def utilization(self) -> dict[str, BundleUtilization]:
        """Per debug directory: quota, bytes available to bundles, bytes used."""
        limit = self.context.value.storage_limit
        out = {}
        for d in self.debug_dirs:
            quota = await trio.to_thread.run_sync(self._quota, d)
            used = sum(b.size for b in self._in_dir(d))
            out[str(d)] = BundleUtilization(
                bytes_available=bytes_available(quota, limit), bytes_used=used, dataset_quota=quota
            )
        return out

    async def cleanup(self) -> dict[str, CleanupCount]:
        """Delete the lowest-priority bundles of each directory until it fits its limit."""
        ctx = self.context.value
        counts = {}
        for d in self.debug_dirs:
            quota = await trio.to_thread.run_sync(self._quota, d)
            plan = plan_cleanup(
                self._in_dir(d),
                bytes_available=bytes_available(quota, ctx.storage_limit),
                priority=ctx.priority,
            )
            for victim in plan.delete:
                await trio.to_thread.run_sync(_unlink_all, victim.paths)
                self._forget_paths(victim)
            counts[str(d)] = CleanupCount(bundles=len(plan.delete), bytes=plan.bytes_freed)
            if plan.delete:
                log.info("bundles_cleaned", debug_dir=str(d), bundles=len(plan.delete))
        return counts

    def _forget_paths(self, victim: BundleInfo) -> None:
        known = self.index.get(victim.zone_name, victim.bundle_id)
        if known is None:
            return
        left = tuple(p for p in known.paths if p not in victim.paths)
        if left:
            self.index.add(attrs.evolve(known, paths=left))
        else:
            self.index.remove(victim.zone_name, victim.bundle_id)

    async def update_context(self, update: CleanupContextUpdate) -> CleanupContext:
        """Validate, persist and apply; ``BadRequest`` naming the field on bad values."""
        new = apply_update(self.context.value, update)
        await trio.to_thread.run_sync(self._persist_context, new)
        self.context.value = new
        return new

    def _persist_context(self, ctx: CleanupContext) -> None:
        self.context_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.context_path.with_name(self.context_path.name + ".tmp")
        tmp.write_bytes(msgspec.toml.encode(msgspec.to_builtins(ctx)))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.context_path)

    async def run_periodic_cleanup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Clean up every ``period``; a new period takes effect at once."""
        task_status.started()
        while True:
            period = self.context.value.period.seconds
            with trio.move_on_after(period):
                await self.context.wait_transition()  # period or limit changed: re-arm
                continue
            try:
                await self.cleanup()
            except Exception as exc:  # retried at the next period
                log.error("cleanup_failed", error=repr(exc))
            self.cleanup_runs.value += 1


def _unlink_all(paths: Sequence[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
