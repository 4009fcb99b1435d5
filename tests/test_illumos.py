"""The illumos backend at the command level: recorded outputs in, exact argv out."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from sledagent._daemon import ConfigError, DaemonConfig, run_daemon
from sledagent._host import Zone, ZoneSpec
from sledagent._illumos import (
    SNAPSHOT_PROPERTY,
    CommandFailed,
    IllumosConfig,
    IllumosZoneBackend,
    RunResult,
    parse_ptree_pids,
    parse_quota,
    require_tools,
)

FIXTURES = Path(__file__).parent / "fixtures" / "illumos"
RUNNING = "oxz_propolis-server_2b5c6c4e-0d1b-4c47-9b63-5a0e2f9c1a10"
INSTALLED = "oxz_propolis-server_7e21d6a0-5b3f-4e1c-8f0e-2a9d4c6b1e33"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class RecordedRunner:
    """Answers each argv from a table (exact argv, or its first words); records calls."""

    def __init__(self, answers: dict[tuple[str, ...], RunResult | bytes]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str]) -> RunResult:
        argv = tuple(argv)
        self.calls.append(argv)
        for n in range(len(argv), 0, -1):
            answer = self.answers.get(argv[:n])
            if answer is not None:
                return answer if isinstance(answer, RunResult) else RunResult(0, answer)
        return RunResult(0, b"")


def backend(runner: RecordedRunner, root: Path = Path("/zone")) -> IllumosZoneBackend:
    return IllumosZoneBackend(IllumosConfig(zone_root=root), runner)


LIST = ("pfexec", "zoneadm", "list", "-cp")


async def test_list_zones_parses_zoneadm_and_keeps_only_vmm_zones() -> None:
    runner = RecordedRunner({LIST: fixture("zoneadm-list-cp.txt")})
    zones = await backend(runner).list_zones()
    assert [z.name for z in zones] == [RUNNING, INSTALLED]
    assert zones[0].propolis_id == uuid.UUID(RUNNING.rsplit("_", 1)[1])
    assert runner.calls == [LIST]


async def test_a_running_zone_is_halted_uninstalled_and_deleted_in_that_order() -> None:
    runner = RecordedRunner({LIST: fixture("zoneadm-list-cp.txt")})
    await backend(runner).halt_and_remove(Zone(RUNNING, None, ""))
    assert runner.calls == [
        LIST,
        ("pfexec", "zoneadm", "-z", RUNNING, "halt"),
        ("pfexec", "zoneadm", "-z", RUNNING, "uninstall", "-F"),
        ("pfexec", "zonecfg", "-z", RUNNING, "delete", "-F"),
    ]


async def test_removal_is_idempotent_an_installed_zone_skips_halt_and_a_gone_one_does_nothing() -> (
    None
):
    runner = RecordedRunner({LIST: fixture("zoneadm-list-cp.txt")})
    b = backend(runner)
    await b.halt_and_remove(Zone(INSTALLED, None, ""))
    await b.halt_and_remove(Zone("oxz_propolis-server_gone", None, ""))
    assert runner.calls == [
        LIST,
        ("pfexec", "zoneadm", "-z", INSTALLED, "uninstall", "-F"),
        ("pfexec", "zonecfg", "-z", INSTALLED, "delete", "-F"),
        LIST,
    ]


async def test_stopping_a_zones_vmm_kills_its_propolis_and_tolerates_none_running() -> None:
    kill = ("pfexec", "zlogin", RUNNING, "pkill", "-KILL", "-x", "propolis-server")
    runner = RecordedRunner({kill: RunResult(1, b"")})  # pkill: 1 = nothing matched
    await backend(runner).stop_vmm(Zone(RUNNING, None, ""))
    assert runner.calls == [kill]
    runner = RecordedRunner({kill: RunResult(2, b"pkill: bad zone")})
    with pytest.raises(CommandFailed):
        await backend(runner).stop_vmm(Zone(RUNNING, None, ""))


async def test_install_configures_installs_and_boots_and_cleans_up_on_failure() -> None:
    pid = uuid.UUID(RUNNING.rsplit("_", 1)[1])
    spec = ZoneSpec(pid, uuid.uuid4(), "[fd00::21]:12400")
    ok = RecordedRunner({})
    zone = await backend(ok).install(spec)
    assert zone.name == RUNNING and zone.propolis_addr == "[fd00::21]:12400"
    assert ok.calls[0][:4] == ("pfexec", "zonecfg", "-z", RUNNING)
    assert f"set zonepath=/zone/{RUNNING}" in ok.calls[0][4]
    assert ok.calls[1:] == [
        ("pfexec", "zoneadm", "-z", RUNNING, "install"),
        ("pfexec", "zoneadm", "-z", RUNNING, "boot"),
    ]
    failing = RecordedRunner(
        {
            ("pfexec", "zoneadm", "-z", RUNNING, "boot"): RunResult(1, b"boot failed"),
            LIST: fixture("zoneadm-list-cp.txt"),
        }
    )
    with pytest.raises(CommandFailed, match="boot failed"):
        await backend(failing).install(spec)
    assert failing.calls[-1] == ("pfexec", "zonecfg", "-z", RUNNING, "delete", "-F")


async def test_bundle_commands_are_omicrons_list_with_the_services_own_pids() -> None:
    z = ("pfexec", "zlogin", RUNNING)
    runner = RecordedRunner(
        {
            (*z, "svcs", "-H", "-o", "fmri"): fixture("svcs-H-o-fmri.txt"),
            (*z, "ptree", "-s", "svc:/oxide/propolis-server:default"): fixture(
                "ptree-s-propolis.txt"
            ),
            (*z, "ptree", "-s"): fixture("ptree-s-minimal.txt"),
        }
    )
    cmds = await backend(runner).bundle_commands(Zone(RUNNING, None, ""))
    assert [(c.name, c.argv) for c in cmds] == [
        ("ptree", (*z, "ptree")),
        ("uptime", (*z, "uptime")),
        ("last", (*z, "last")),
        ("who", (*z, "who")),
        ("svcs", (*z, "svcs", "-p")),
        ("netstat", (*z, "netstat", "-an")),
        ("pfiles.9102", (*z, "pfiles", "9102")),
        ("pstack.9102", (*z, "pstack", "9102")),
        ("pargs.9102", (*z, "pargs", "9102")),
    ]
    assert parse_ptree_pids(fixture("ptree-s-minimal.txt").decode()) == []


async def test_a_snapshot_is_per_bundle_tagged_read_through_zfs_snapshot_and_destroyed(
    tmp_path: Path,
) -> None:
    bundle_id = uuid.uuid4()
    logs = tmp_path / RUNNING / ".zfs" / "snapshot" / str(bundle_id) / "root/var/svc/log"
    logs.mkdir(parents=True)
    for name in ("oxide-propolis-server:default.log", "oxide-propolis-server:default.log.0"):
        (logs / name).write_bytes(b"{}\n" * 10)
    (logs / "system-other:default.log").write_bytes(b"not ours")
    z = ("pfexec", "zlogin", RUNNING)
    runner = RecordedRunner(
        {(*z, "svcs", "-L", "svc:/oxide/propolis-server:default"): fixture("svcs-L-propolis.txt")}
    )
    b = backend(runner, tmp_path)
    snap = await b.snapshot(Zone(RUNNING, None, ""), bundle_id)
    dataset = f"rpool/zone/{RUNNING}@{bundle_id}"
    assert runner.calls[0] == (
        "pfexec", "zfs", "snapshot", "-o", f"{SNAPSHOT_PROPERTY}=true", dataset,
    )  # fmt: skip
    assert [f.name for f in snap.files] == [
        "oxide-propolis-server:default.log",
        "oxide-propolis-server:default.log.0",
    ]
    assert all(f.path.startswith(str(tmp_path / RUNNING / ".zfs" / "snapshot")) for f in snap.files)
    await b.destroy_snapshot(snap)
    assert runner.calls[-1] == ("pfexec", "zfs", "destroy", dataset)


async def test_the_startup_sweep_destroys_only_snapshots_carrying_our_property() -> None:
    listing = ("pfexec", "zfs", "list", "-H", "-p", "-t", "snapshot", "-o")
    runner = RecordedRunner({listing: fixture("zfs-list-snapshots.txt")})
    assert await backend(runner).sweep_snapshots() == 2
    destroyed = [c[-1] for c in runner.calls if c[:3] == ("pfexec", "zfs", "destroy")]
    assert destroyed == [
        f"rpool/zone/{RUNNING}@5e1d3c2a-7b4f-4a6e-9c8d-0f1e2d3c4b5a",
        f"rpool/zone/{INSTALLED}@a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    ]


async def test_quota_and_availability_come_from_zfs_list() -> None:
    runner = RecordedRunner({("pfexec", "zfs", "list", "-Hpo"): fixture("zfs-list-quota.txt")})
    assert await backend(runner).quota("rpool/debug") == (107374182400, 53687091200)
    assert runner.calls == [("pfexec", "zfs", "list", "-Hpo", "quota,avail", "rpool/debug")]
    assert parse_quota("0\t1024\n") == (None, 1024)


async def test_a_host_without_zones_refuses_the_illumos_backend_with_a_clear_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="not found: zoneadm"):
        require_tools(("zoneadm",))
    with pytest.raises(ConfigError, match='set propolis = "external"'):
        DaemonConfig(backend="illumos", propolis="sim")
    config = DaemonConfig(backend="illumos", propolis="external", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs zoneadm"):
        await run_daemon(config, trio.Event())


async def test_a_restart_on_illumos_takes_back_a_running_propolis_zone_from_zoneadm_and_the_journal(
    tmp_path: Path,
) -> None:
    """``zoneadm list -cp`` (recorded) shows the VMM's zone running; the journal holds its
    registration (where its Propolis listens) and state; its Propolis answers Running.
    The zone is taken back: no halt, no uninstall, nothing new told to Nexus. The zone
    listed ``installed`` (not booted) belonged to a VMM whose guest is gone: it fails."""
    import attrs

    from sledagent import VmmState
    from sledagent._agent import open_sled_agent
    from sledagent._journal import StateJournal
    from sledagent._vmm_state import initial_state
    from sledagent._wire import (
        InstanceEnsureRequest,
        InstanceProperties,
        InstanceState,
        PropolisInstanceMetadata,
        VmmRuntimeState,
        utcnow,
    )
    from sledagent.testing import FakeHost, ensure_body, fast_config

    running_id = uuid.UUID(RUNNING.rsplit("_", 1)[1])
    installed_id = uuid.UUID(INSTALLED.rsplit("_", 1)[1])
    journal = StateJournal(tmp_path / "journal.sqlite3")
    await journal.load()
    state = initial_state(
        VmmRuntimeState(gen=4, state=VmmState.RUNNING, time_updated=utcnow()), None, utcnow()
    )
    body = ensure_body(propolis_addr="[fd00::5]:12400")
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for pid in (running_id, installed_id):
            journal.record_registration(pid, body, state)
            journal.acknowledged(pid, 4)
            await journal.durable(journal.mark(pid, ensured=True, seen_live=True))
        nursery.cancel_scope.cancel()

    runner = RecordedRunner({LIST: fixture("zoneadm-list-cp.txt")})
    fakes = FakeHost()
    vm = fakes.propolis.client_for(Zone(RUNNING, running_id, ""))
    meta = PropolisInstanceMetadata(
        project_id=body.metadata.project_id, silo_id=body.metadata.silo_id,
        sled_id=uuid.uuid4(), sled_model="sledagent", sled_revision=0, sled_serial="s",
    )  # fmt: skip
    props = InstanceProperties(description="", id=body.instance_id, metadata=meta, name="g")
    await vm.ensure(InstanceEnsureRequest(init={"method": "Spec"}, properties=props))
    vm.push(InstanceState.RUNNING)  # its VM exists, running
    host = attrs.evolve(
        fakes.host(), backend=backend(runner), journal=StateJournal(tmp_path / "journal.sqlite3")
    )
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.5), host) as agent:
            entry = agent.manager.registry.get(running_id)
            await entry.runner.adopted.wait()
            assert entry.state == state  # same generation, same state
            assert entry.runner.zone.propolis_addr == "[fd00::5]:12400"
            await fakes.nexus.wait_for(installed_id, VmmState.FAILED)
            await agent.notifier.wait_idle()
    assert fakes.nexus.states_for(running_id) == []  # nothing changed: nothing told
    touched = [c for c in runner.calls if RUNNING in c]
    assert touched == []  # never halted, uninstalled or deleted
