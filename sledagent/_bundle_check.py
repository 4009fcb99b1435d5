"""Is this file a whole zone bundle? Blocking checks, run in worker threads by the store.

A whole bundle is a regular file named ``<bundle_id>.tar.gz`` directly in its zone's
directory, whose first member is a ``metadata.toml`` naming that zone and that bundle,
and whose gzip stream ends where its writer finished it (``NotABundle`` says why not).

The end is checked without decompressing the whole file when the bundle was written by
this agent: its writer (``_archive``) makes a full flush (``00 00 ff ff``, the dictionary
reset) just before the tar's end-of-archive blocks, so the last few hundred bytes are a
raw deflate stream of their own. ``stream_ends_whole`` reads the last 4 KiB and inflates
from the last flush point: it must decode to at least 1024 zero bytes (tar's two end
blocks and padding), end with the final block, and leave exactly the 8-byte gzip trailer,
whose ISIZE is a multiple of 512 (a tar is whole 512-byte blocks). A file cut anywhere
before its end has none of that in its last bytes. If the fast check fails (a truncated
file, or a bundle without the flush: older versions, other writers), the authority is a
full decompression (``verify_gzip``: every member's CRC-32 and length, nothing after
them), so a file is never quarantined on the fast check alone. Bit rot in the middle of
a file with a whole end is not looked for: that needs the full pass on every file.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import tomllib
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO

import msgspec
from isal import igzip

from ._archive import BUNDLE_SUFFIX
from ._wire import ZoneBundleMetadata

TAIL_WINDOW = 4096
FLUSH_MARK = b"\x00\x00\xff\xff"
_MAX_TAIL_OUTPUT = 1 << 20
_READ_CHUNK = 1 << 20


class NotABundle(ValueError):
    """The file is not a whole bundle; the message says why (shown to operators)."""


def read_bundle_metadata(path: Path) -> ZoneBundleMetadata:
    """Read ``metadata.toml`` from a bundle (only the start of the file is decompressed);
    ``NotABundle`` if it is not valid."""
    try:
        with open(path, "rb") as f:
            return _metadata(f)
    except OSError as exc:
        raise NotABundle(f"unreadable bundle: {exc}") from exc


def _metadata(f: BinaryIO) -> ZoneBundleMetadata:
    try:
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:gz") as tar:
            member = tar.next()
            if member is None or member.name != "metadata.toml":
                raise NotABundle("first entry is not metadata.toml")
            extracted = tar.extractfile(member)
            if extracted is None:
                raise NotABundle("metadata.toml is not a file")
            doc = tomllib.loads(extracted.read().decode())
    except (OSError, tarfile.TarError, EOFError, tomllib.TOMLDecodeError, UnicodeError) as exc:
        raise NotABundle(f"unreadable bundle: {exc}") from exc
    try:
        return msgspec.convert(doc, ZoneBundleMetadata, strict=False)
    except msgspec.ValidationError as exc:
        raise NotABundle(f"invalid metadata.toml: {exc}") from exc


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file: never through a symbolic
    link, never blocking on a FIFO. ``NotABundle`` otherwise; ``FileNotFoundError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a link
            raise NotABundle("not a regular file") from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise NotABundle(f"unreadable: {exc}") from exc
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise NotABundle("not a regular file")
    return f


def stream_ends_whole(f: BinaryIO) -> bool:
    """The fast check of the gzip stream's end (see the module docstring); ``False``
    means "not proven", never "broken"."""
    size = f.seek(0, os.SEEK_END)
    n = min(size, TAIL_WINDOW)
    f.seek(size - n)
    tail = f.read(n)
    if len(tail) < len(FLUSH_MARK) + 8 or int.from_bytes(tail[-4:], "little") % 512:
        return False
    end = len(tail) - 8
    for _ in range(8):  # the flush mark is normally the last one; a few tries suffice
        end = tail.rfind(FLUSH_MARK, 0, end)
        if end < 0:
            return False
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, empty dictionary
        try:
            out = inflater.decompress(tail[end + len(FLUSH_MARK) :], _MAX_TAIL_OUTPUT)
        except zlib.error:
            continue
        if (
            inflater.eof
            and not inflater.unconsumed_tail
            and inflater.unused_data == tail[-8:]
            and len(out) >= 1024
            and out.count(0) == len(out)
        ):
            return True
    return False


def verify_gzip(f: BinaryIO) -> None:
    """Decompress the whole file, checking every member's CRC-32 and length and that
    nothing but members follows; ``NotABundle`` naming what is wrong."""
    f.seek(0)
    try:
        with igzip.IGzipFile(fileobj=f, mode="rb") as gz:  # type: ignore[no-untyped-call]
            while gz.read(_READ_CHUNK):
                pass
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        extra = trailing_bytes(f)
        if extra:  # whole members, then something else: not a cut, not bit rot
            raise NotABundle(
                f"trailing data after the archive: {extra} bytes after its last gzip member"
            ) from exc
        if isinstance(exc, EOFError):
            raise NotABundle(f"truncated: {exc}") from exc
        raise NotABundle(f"corrupt gzip stream: {exc}") from exc


def trailing_bytes(f: BinaryIO) -> int:
    """How many bytes follow the file's last whole gzip member when what follows is
    not a gzip member (``echo garbage >> bundle``); 0 when the members themselves are
    cut or corrupt. Only run on a file ``verify_gzip`` refused, so a second pass is
    fine."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    inflater = zlib.decompressobj(31)  # one gzip member
    pos = 0  # file offset of feed[0]
    feed = f.read(_READ_CHUNK)
    try:
        while feed:
            inflater.decompress(feed, _READ_CHUNK)  # the output is not needed
            if not inflater.eof:
                tail = inflater.unconsumed_tail
                pos += len(feed) - len(tail)
                feed = tail or f.read(_READ_CHUNK)
                continue
            rest = inflater.unused_data
            member_end = pos + len(feed) - len(rest)
            if len(rest) < 2:
                rest += f.read(2 - len(rest))
            if not rest:
                return 0  # ends after a whole member: nothing trails
            if not rest.startswith(b"\x1f\x8b"):
                return size - member_end
            inflater, pos, feed = zlib.decompressobj(31), member_end, rest
    except zlib.error:
        return 0  # a member is corrupt: that is what is wrong
    return 0  # the last member never ended: truncated


def check_bundle(path: Path, debug_dir: Path) -> ZoneBundleMetadata:
    """The metadata of the whole bundle at ``path`` (under ``debug_dir``), or
    ``NotABundle`` naming why it is not one; ``FileNotFoundError`` if it is gone."""
    rel = path.relative_to(debug_dir)
    with open_regular(path) as f:
        if len(rel.parts) != 2:
            raise NotABundle("not directly in a zone's bundle directory")
        zone_name, name = rel.parts
        stem = name.removesuffix(BUNDLE_SUFFIX)
        try:
            if stem == name:
                raise ValueError
            named_id = uuid.UUID(stem)
        except ValueError:
            raise NotABundle(f"not named <bundle id>{BUNDLE_SUFFIX}") from None
        meta = _metadata(f)
        if meta.id.zone_name != zone_name:
            raise NotABundle(
                f"metadata.toml names zone {meta.id.zone_name!r}, not its directory {zone_name!r}"
            )
        if meta.id.bundle_id != named_id:
            raise NotABundle(f"metadata.toml names bundle {meta.id.bundle_id}, not its file name")
        if not stream_ends_whole(f):
            verify_gzip(f)
    return meta


def copy_ends_whole(path: Path) -> tuple[int, bool]:
    """Before serving a copy: its size and whether its end is proven whole (the fast
    check), through the same regular-file-only open."""
    with open_regular(path) as f:
        return os.fstat(f.fileno()).st_size, stream_ends_whole(f)
