"""The daemon's data directory: held by one agent at a time, and the sled's identity.

Two agents on one data directory would both take back the same VMMs (each its own
runner, monitor and publications under the same generations): a start finds the
directory's lock held and refuses with one line. The lock is an ``flock`` on
``<data_dir>/.lock``, released by the kernel when the process dies, so a kill -9 never
leaves it stuck; the file says which pid holds it.

The sled id is kept in ``<data_dir>/sled-id``: a restarted agent is the same sled (its
Propolis metadata and Nexus's view of it must not change across restarts).
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ._failures import StartupError

LOCK_NAME = ".lock"
SLED_ID_NAME = "sled-id"
BOOT_ID_NAME = "boot-id"
#: Linux's id of the current boot (a new one at every boot).
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _lock(data_dir: Path) -> int:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StartupError(f"data_dir {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"data_dir {data_dir} is in use by another sledagent (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@asynccontextmanager
async def hold_data_dir(data_dir: Path) -> AsyncIterator[None]:
    """Hold ``data_dir`` for this process for the duration of the block."""
    fd = await trio.to_thread.run_sync(_lock, Path(data_dir))
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def host_rebooted(data_dir: Path) -> bool:
    """Whether the host booted since the last agent start on ``data_dir`` (the boot id
    kept there differs from the current one), and keep the current one. A host reboot
    ends every guest: the start then tells Nexus at once instead of waiting for each
    Propolis to stay unreachable. Unknown (no boot id on this host, or none kept): False."""
    path = Path(data_dir) / BOOT_ID_NAME
    try:
        current = _BOOT_ID.read_text().strip()
    except OSError:
        return False
    try:
        previous: str | None = path.read_text().strip()
    except FileNotFoundError:
        previous = None
    if previous != current:
        tmp = path.with_name(f".{BOOT_ID_NAME}.tmp")
        tmp.write_text(f"{current}\n")
        os.replace(tmp, path)
    return previous is not None and previous != current


def sled_id_of(data_dir: Path) -> uuid.UUID:
    """This sled's id: read from the data directory, or made and kept there."""
    path = Path(data_dir) / SLED_ID_NAME
    try:
        return uuid.UUID(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise StartupError(f"{path}: not a sled id ({exc}); remove it to get a new one") from None
    sled_id = uuid.uuid4()
    tmp = path.with_name(f".{SLED_ID_NAME}.tmp")
    tmp.write_text(f"{sled_id}\n")
    os.replace(tmp, path)
    return sled_id
