"""Checks the daemon makes on the host before it touches anything: its directories can
be created and written, and its API address can be bound.

Why before anything: a second ``sledagent run`` on the same data directory would
otherwise sweep the first one's zones at start (they are "unexpected" to it) before
failing to bind the API's port. Each failure is one line naming the key and the reason
(``StartupError``, exit status 1); the real bind is translated the same way, in case the
port is taken in between.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ._addr import parse_listen
from ._daemon_config import DaemonConfig
from ._failures import ListenError, StartupError, os_reason

_LISTEN_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "not an address of this host",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def listen_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "no such host"
    return _LISTEN_REASONS.get(exc.errno or 0) or os_reason(exc)


def check_listen(listen: str) -> None:
    """Raise ``ListenError`` if ``listen`` cannot be bound now (blocking; port 0: no
    check). Binds as the server does (``SO_REUSEADDR``) and closes at once."""
    host, port = parse_listen(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(1)
    except OSError as exc:
        raise ListenError(listen, listen_reason(exc)) from None


def _usable_dir(key: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(f"{key} {path}: exists and is not a directory") from None
    except OSError as exc:
        raise StartupError(f"{key} {path}: cannot create: {os_reason(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"{key} {path}: not writable by this user")


def prepare_host(config: DaemonConfig) -> None:
    """Create the data and debug directories and check the API's address (blocking)."""
    _usable_dir("data_dir", config.data_dir)
    for d in config.bundle_dirs():
        _usable_dir("debug_dirs" if config.debug_dirs else "data_dir", d)
    check_listen(config.listen)
