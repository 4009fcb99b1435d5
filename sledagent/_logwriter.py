"""A zone's stand-in VMM process for the local backend: writes Propolis-like JSON logs.

Run as ``python -m sledagent._logwriter --log-dir D --archive-dir A ...``. It appends
bunyan-style JSON lines (as Propolis logs) to ``oxide-propolis-server:default.log``,
rotates it at ``--rotate-bytes`` into ``.log.0``, ``.log.1``... (newest is ``.0``), keeps
``--keep`` rotated files and moves older ones to the archive directory with a Unix
timestamp suffix, as omicron's log archiving does. SIGTERM ends it cleanly.

``log_lines`` is also used by the backend to seed a zone with realistic log volume.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

SERVICE_LOG = "oxide-propolis-server:default.log"

_MESSAGES = [
    "vCPU exit",
    "request completed",
    "received state-monitor request",
    "instance state changed",
    "block request completed",
    "virtio-net queue notify",
    "migration phase progress",
    "serial console connection",
]


def log_lines(n_bytes: int, rng: random.Random, *, start: float | None = None) -> bytes:
    """About ``n_bytes`` of JSON log lines, varied like a VMM's log (compresses ~10x)."""
    host, pid = socket.gethostname(), os.getpid()
    t = start if start is not None else time.time() - n_bytes / 2000
    out: list[str] = []
    size = 0
    while size < n_bytes:
        t += rng.expovariate(50.0)
        line = json.dumps(
            {
                "msg": rng.choice(_MESSAGES),
                "v": 0,
                "name": "propolis-server",
                "level": rng.choice((30, 30, 30, 20, 40)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
                + f".{int(t % 1 * 1e6):06d}Z",
                "hostname": host,
                "pid": pid,
                "component": rng.choice(("vmm", "vcpu", "block", "net", "server")),
                "vcpu": rng.randrange(16),
                "req_id": f"{rng.getrandbits(64):016x}",
                "latency_us": int(rng.lognormvariate(4, 1.5)),
            },
            separators=(",", ":"),
        )
        out.append(line)
        size += len(line) + 1
    return ("\n".join(out) + "\n").encode()


def start_log(log_dir: Path, zone_name: str) -> None:
    """Create the service's log with its first line, as a service's log exists from its
    start: a VMM that lives a few milliseconds still leaves a log in its bundle."""
    log_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {
            "msg": "propolis-server starting",
            "v": 0,
            "name": "propolis-server",
            "level": 30,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "component": "server",
            "zone_name": zone_name,
        },
        separators=(",", ":"),
    )
    with open(log_dir / SERVICE_LOG, "ab") as f:
        f.write(line.encode() + b"\n")


def rotate(log_dir: Path, archive_dir: Path, keep: int) -> None:
    """Shift ``.log`` -> ``.log.0`` -> ``.log.1``...; beyond ``keep``, archive."""
    base = log_dir / SERVICE_LOG
    oldest = log_dir / f"{SERVICE_LOG}.{keep - 1}"
    if oldest.exists():
        archive_dir.mkdir(parents=True, exist_ok=True)
        stamp = int(time.time())
        target = archive_dir / f"{SERVICE_LOG}.{stamp}"
        while target.exists():
            stamp += 1
            target = archive_dir / f"{SERVICE_LOG}.{stamp}"
        os.rename(oldest, target)
    for i in range(keep - 2, -1, -1):
        src = log_dir / f"{SERVICE_LOG}.{i}"
        if src.exists():
            os.rename(src, log_dir / f"{SERVICE_LOG}.{i + 1}")
    if base.exists():
        os.rename(base, log_dir / f"{SERVICE_LOG}.0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--archive-dir", type=Path, required=True)
    parser.add_argument("--zone-name", required=True)  # identifies the process in ps
    parser.add_argument("--rate-bps", type=int, default=2048)
    parser.add_argument("--rotate-bytes", type=int, default=1 << 20)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument(
        "--daemonize", action="store_true", help="detach (own session), print the pid, exit"
    )
    args = parser.parse_args(argv)
    start_log(args.log_dir, args.zone_name)  # before the pid is printed: install waits
    if args.daemonize:
        # The zone's process must not be the agent's child: zones outlive an agent
        # restart, and the agent halts them the same way whether it started them or not.
        pid = os.fork()
        if pid > 0:
            print(pid, flush=True)
            return 0
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

    running = True

    def stop(_signo: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    rng = random.Random()
    path = args.log_dir / SERVICE_LOG
    interval = 0.5
    while running:
        with open(path, "ab") as f:
            f.write(log_lines(max(1, int(args.rate_bps * interval)), rng))
        if path.stat().st_size >= args.rotate_bytes:
            rotate(args.log_dir, args.archive_dir, args.keep)
        time.sleep(interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
