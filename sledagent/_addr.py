"""Addresses an operator types: ``host:port`` to listen on, ``http://host:port`` to reach.

Checked when the config is built (a bad one is a config error naming the key), and by
the server before it binds, so that ``127.0.0.1:99999`` is refused rather than bound to
port 34463 (the kernel keeps the low 16 bits) and ``not-an-address`` is never a DNS
lookup's traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
from urllib.parse import urlsplit

LISTEN_FORMAT = "host:port with a port 0..65535 (IPv6 as [::1]:port)"
URL_FORMAT = "an http://host:port URL"

# A DNS name (RFC 1123): labels of letters, digits and hyphens; the last not all digits
# (so ``999.1.1.1`` is neither an IPv4 address nor a name).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _host_ok(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        return (
            len(host) <= 253
            and all(_LABEL.match(label) for label in labels)
            and not labels[-1].isdigit()
        )
    return True


def _port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    return port if port <= 65535 else None


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``host:port`` -> (host to bind, or None for every interface; port).

    ``127.0.0.1:12345``, ``[::1]:0``, ``localhost:8080``, ``:12345`` (every interface).
    Raises ``ValueError`` saying what is expected (``LISTEN_FORMAT``)."""
    host, sep, port_text = listen.rpartition(":")
    port = _port(port_text)
    if not sep or port is None or (host and not _host_ok(host)):
        raise ValueError(f"expected {LISTEN_FORMAT}, got {json.dumps(listen)}")
    if host.count(":") and not host.startswith("["):
        raise ValueError(f"expected {LISTEN_FORMAT}, got {json.dumps(listen)}")
    return (host.strip("[]") or None), port


def check_http_url(url: str) -> str:
    """Return ``url`` if it is ``http://host:port`` (a trailing ``/`` allowed);
    ``ValueError`` otherwise. Refused, as nothing would honour them: a missing port (the
    message asks for one), ``user:password@`` (it would be sent as part of the Host
    header and logged), a path (requests go to the API's own paths: a ``/api/v1`` would
    be dropped), a query or a fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        raise ValueError(f"expected {URL_FORMAT}, got {json.dumps(url)}") from None
    host = parts.hostname or ""
    bracketed = f"[{host}]" if ":" in host else host
    plain = (
        "@" not in parts.netloc
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
        and "?" not in url
        and "#" not in url
    )
    if parts.scheme != "http" or not host or not _host_ok(bracketed) or not port or not plain:
        raise ValueError(f"expected {URL_FORMAT}, got {json.dumps(_shown(url))}")
    return url


def _shown(url: str) -> str:
    """``url`` with any password masked: a refused URL is printed, and may be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
