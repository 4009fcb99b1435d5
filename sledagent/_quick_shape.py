"""The one shape of request the server's quick path takes (issue 21), judged without h11.

The quick path (``_http._Connection._quick``) answers a state read before h11 sees it, so
it must never take a request h11 would refuse (issue 16): whatever it takes, h11 reads as
the same bodyless ``GET`` (``tests/test_http_quick_shape.py`` checks it as a property).
Everything else goes to h11, which judges it as usual.

The shape: ``GET <target> HTTP/1.1``, header lines of a token name, a colon with no space
before it and a value of visible ASCII, spaces and tabs (no obs-text, no folded line: RFC
9112 5.2), the blank line, and nothing after it; exactly one ``Host`` (RFC 9112 3.2: none,
or two, is a 400); no header that gives the request a body or a meaning the quick path does
not implement (``Content-Length``, ``Transfer-Encoding``, ``Expect``, ``Upgrade``,
``TE``, and ``Connection`` unless it says only ``keep-alive``, what HTTP/1.1 does anyway:
httpx and requests send it on every request).
"""

from __future__ import annotations

import re

_SIMPLE_GET = re.compile(
    rb"GET (/[!-~]*) HTTP/1\.1\r\n((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*[!-~ \t]*\r\n)+)\r\n"
)
_NOT_SIMPLE = re.compile(
    rb"(?:^|\n)(?:content-length|transfer-encoding|expect|upgrade|te):"
    rb"|(?:^|\n)connection:(?![ \t]*keep-alive[ \t]*\r\n)",
    re.I,
)
_HOST = re.compile(rb"(?:^|\n)host:", re.I)


def simple_get_target(data: bytes, max_head_bytes: int) -> bytes | None:
    """The target of ``data`` (``/vmms/.../state``) if ``data`` is exactly one request of
    the quick path's shape within ``max_head_bytes``; None: h11 must judge it."""
    if len(data) > max_head_bytes:
        return None
    match = _SIMPLE_GET.fullmatch(data)
    if match is None:
        return None
    headers = match[2]
    if _NOT_SIMPLE.search(headers) or len(_HOST.findall(headers)) != 1:
        return None
    return match[1]
