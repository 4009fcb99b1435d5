"""The daemon's configuration: one TOML file and the flags of ``sledagent run``.

One schema (``DaemonConfig``, its ``[agent]`` table ``AgentConfig``, and any attrs class
nested in them), checked once by ``_schema.build``: strict types (no coercion), bounds
from the fields' validators, unknown keys refused. Every problem is one line naming the
key (or the flag that set it), the value and what is allowed; the reference is
docs/operations.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
from attrs import validators as v

from ._addr import LISTEN_FORMAT, URL_FORMAT, check_http_url, parse_listen
from ._admission import ReadLimits
from ._config import AgentConfig
from ._failures import ConfigError as ConfigError
from ._failures import os_reason
from ._schema import EXPECT, build
from ._server import DEFAULT_LISTEN, HttpLimits


def _listen(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    parse_listen(value)


def _url(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        check_http_url(value)


def _paths(dirs: Any) -> tuple[Path, ...]:
    if isinstance(dirs, str | Path):  # one directory is not a list of its letters
        raise TypeError(f"debug_dirs must be a list of paths, not {dirs!r}")
    return tuple(Path(d) for d in dirs)


def _listen_field(default: str) -> Any:
    return attrs.field(default=default, validator=_listen, metadata={EXPECT: LISTEN_FORMAT})


def _url_field() -> Any:
    return attrs.field(default=None, validator=_url, metadata={EXPECT: URL_FORMAT})


@attrs.frozen(kw_only=True)
class DaemonConfig:
    """``sledagent run``'s settings (docs/operations.md, "Configuration")."""

    listen: str = _listen_field(DEFAULT_LISTEN)
    data_dir: Path = attrs.field(default=Path("sledagent-data"), converter=Path)
    #: Nexus's base URL; unset: a recording Nexus (in the ``sledagent sim`` host process).
    nexus_url: str | None = _url_field()
    #: Where the embedded recording Nexus listens (no ``nexus_url``); port 0: any free.
    nexus_listen: str = _listen_field("127.0.0.1:0")
    #: Where each simulated Propolis (``propolis = "sim"``) listens: port 0, any free
    #: one; another port P, the first free one from P up (one per zone).
    sim_propolis_listen: str = _listen_field("127.0.0.1:0")
    #: Bearer token required by every route but /metrics (also from $SLEDAGENT_TOKEN).
    token: str | None = attrs.field(
        default=None,
        validator=v.optional(v.min_len(1)),
        metadata={EXPECT: "a non-empty string"},
    )
    #: ``sim``: a simulated Propolis per zone, in a ``sledagent sim`` process of its own
    #: that outlives the agent (found again at the next start; it also runs the recording
    #: Nexus when ``nexus_url`` is unset); ``sim-inprocess``: the same in this process (they
    #: die with it; benchmarks); ``remote``: launched by the ``sledagent sim`` process at
    #: ``sim_fleet_url``; ``external``: already listening at each VMM's registered address.
    propolis: Literal["sim", "sim-inprocess", "remote", "external"] = "sim"
    #: ``local``: zones as directory trees under data_dir (any host); ``illumos``: real
    #: zones, SMF and ZFS (needs zoneadm, zonecfg, zlogin, zfs; Propolis is external).
    backend: Literal["local", "illumos"] = "local"
    #: illumos: where zones live and their parent dataset.
    zone_root: Path = attrs.field(default=Path("/zone"), converter=Path)
    zone_dataset: str = "rpool/zone"
    #: illumos: the dataset of the debug directories; its ZFS quota (``zfs list -Hpo
    #: quota,avail``) is the bundle quota unless ``bundle_quota_bytes`` is set.
    debug_dataset: str | None = None
    sim_fleet_url: str | None = _url_field()
    #: Debug directories for bundles (one per M.2 on a real sled); default data_dir/debug.
    #: Left out: data_dir/debug. An empty list is refused (it is not "the default").
    debug_dirs: tuple[Path, ...] | None = attrs.field(
        default=None,
        converter=attrs.converters.optional(_paths),
        validator=v.optional(v.min_len(1)),
        metadata={EXPECT: "a non-empty list of paths (leave it out for data_dir/debug)"},
    )
    bundle_quota_bytes: int | None = attrs.field(default=None, validator=v.optional(v.ge(1)))
    #: Per-file cap in a bundle (MiB); a larger file keeps its newest bytes.
    max_bundle_file_mb: int = attrs.field(default=64, validator=v.ge(1))
    #: Where bundles are compressed: ``process`` (worker processes, one per phase-2 slot,
    #: off the agent's GIL) or ``thread`` (worker threads of the agent's process).
    archive_in: Literal["process", "thread"] = "process"
    #: Each zone's log writer (bytes/s) and the log volume seeded at zone install.
    log_rate_bps: int = attrs.field(default=2048, validator=v.ge(0))
    seed_log_mb: float = attrs.field(default=0.0, validator=v.ge(0))
    #: Where seeded logs are generated once and hard-linked from (benchmarks).
    seed_cache: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    #: The API server's connection cap, limits and timeouts (``[http]``).
    http: HttpLimits = attrs.field(factory=HttpLimits)
    #: When VMM-state reads are refused under overload (``[reads]``, ``_admission``).
    reads: ReadLimits = attrs.field(factory=ReadLimits)

    def __attrs_post_init__(self) -> None:
        if self.propolis == "remote" and not self.sim_fleet_url:
            raise ConfigError('propolis = "remote" needs sim_fleet_url')
        if self.archive_in not in ("process", "thread"):
            raise ConfigError(f'archive_in must be "process" or "thread", not {self.archive_in!r}')
        if self.backend not in ("local", "illumos"):
            raise ConfigError(f'backend must be "local" or "illumos", not {self.backend!r}')
        if self.backend == "illumos" and self.propolis != "external":
            raise ConfigError(
                'backend = "illumos" runs each zone\'s own Propolis: set propolis = "external"'
            )

    def bundle_dirs(self) -> list[Path]:
        return list(self.debug_dirs or ()) or [self.data_dir / "debug"]


#: ``sledagent run`` flags: config key -> flag (a flag overrides the file's key).
RUN_FLAGS = {"listen": "--listen", "data_dir": "--data-dir", "nexus_url": "--nexus"}


def config_from_toml(
    text: str,
    *,
    source: str | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Parse and check a TOML config (docs/operations.md lists every key).

    ``flags``: top-level keys set on the command line (``None`` values are ignored);
    they override the file, and a problem with one names its flag (``RUN_FLAGS``).
    ``source`` (the file's name) prefixes problems with keys from the file. Raises
    ``ConfigError``, one line per problem."""
    where = f"{source}: " if source else ""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}not valid TOML: {exc}") from None
    given = {k: val for k, val in (flags or {}).items() if val is not None}
    for key, val in given.items():
        doc[key] = str(val) if isinstance(val, Path) else val

    def label(path: str) -> str:
        if not path:  # the file as a whole (a rule across keys)
            return source or ""
        if path in given:
            return RUN_FLAGS.get(path, "--" + path.replace("_", "-"))
        return f"{where}{path}"

    return build(DaemonConfig, doc, label=label)


#: The API's bearer token when the config has none.
TOKEN_ENV = "SLEDAGENT_TOKEN"


def api_token(config: DaemonConfig) -> str | None:
    """The bearer token the API requires: the config's ``token``, else
    ``$SLEDAGENT_TOKEN``; ``None``: no authentication. An empty ``$SLEDAGENT_TOKEN`` is
    a ``ConfigError``: it would silently turn authentication off (unset it for that)."""
    if config.token is not None:
        return config.token
    env = os.environ.get(TOKEN_ENV)
    if env is not None and not env.strip():
        raise ConfigError(
            f"${TOKEN_ENV}: expected a non-empty string (unset it to run without a token)"
        )
    return env


def load_config(path: Path | None, *, flags: Mapping[str, Any] | None = None) -> DaemonConfig:
    """The config in ``path`` (none: the defaults) with ``flags`` applied (blocking)."""
    if path is None:
        config = config_from_toml("", flags=flags)
        api_token(config)
        return config
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else f"not UTF-8 text ({exc})"
        raise ConfigError(f"--config {path}: cannot read: {reason}") from None
    config = config_from_toml(text, source=str(path), flags=flags)
    api_token(config)
    return config
