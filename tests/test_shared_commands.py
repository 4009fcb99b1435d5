"""Host-wide diagnostics run once for the zones bundled together, never shared stale."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from sledagent._host import CommandOutput, ZoneSpec
from sledagent._local_zones import HOST_COMMANDS, LocalZoneBackend, LocalZonesConfig
from sledagent._shared_commands import SharedCommands

ARGV = ("ss", "-an")


class Counting:
    def __init__(self, duration_s: float = 0.5, fail: bool = False) -> None:
        self.calls = 0
        self.duration_s = duration_s
        self.fail = fail

    async def __call__(self) -> CommandOutput:
        self.calls += 1
        n = self.calls
        await trio.sleep(self.duration_s)
        if self.fail:
            raise OSError("spawn failed")
        return CommandOutput("ss", ARGV, f"run {n}".encode(), 0, self.duration_s)


async def test_callers_arriving_during_a_run_get_that_runs_output(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared, execute = SharedCommands(ttl_s=1.0), Counting()
    outputs: list[bytes] = []

    async def call() -> None:
        outputs.append((await shared.run(ARGV, execute)).output)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(call)
    assert execute.calls == 1 and outputs == [b"run 1"] * 50
    assert (shared.runs, shared.shared) == (1, 49)


async def test_output_is_shared_within_the_ttl_and_rerun_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared, execute = SharedCommands(ttl_s=1.0), Counting()
    assert (await shared.run(ARGV, execute)).output == b"run 1"
    await trio.sleep(0.9)
    assert (await shared.run(ARGV, execute)).output == b"run 1"
    await trio.sleep(0.2)  # 1.1 s after the run ended: stale
    assert (await shared.run(ARGV, execute)).output == b"run 2"
    assert execute.calls == 2


async def test_a_failed_or_cancelled_run_is_not_shared(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = SharedCommands(ttl_s=10.0)
    failing = Counting(fail=True)
    with pytest.raises(OSError):
        await shared.run(ARGV, failing)
    ok = Counting()
    assert (await shared.run(ARGV, ok)).output == b"run 1"  # ran again, not the failure

    shared = SharedCommands(ttl_s=10.0)
    slow, waiter_execute = Counting(duration_s=5.0), Counting()
    got: list[bytes] = []

    async def first() -> None:
        with trio.move_on_after(1.0):  # e.g. its bundle's command timeout
            await shared.run(ARGV, slow)

    async def second() -> None:
        await trio.sleep(0.1)
        got.append((await shared.run(ARGV, waiter_execute)).output)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
    assert got == [b"run 1"] and waiter_execute.calls == 1  # the waiter ran its own


async def test_zones_bundled_together_share_host_commands_and_list_only_their_processes(
    tmp_path: Path,
) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))
    specs = [ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1") for _ in range(8)]
    with trio.fail_after(30):
        zones = [await backend.install(spec) for spec in specs]
        outputs: dict[str, list[CommandOutput]] = {}

        async def collect(zone_name: str) -> None:
            zone = next(z for z in zones if z.name == zone_name)
            commands = await backend.bundle_commands(zone)
            outputs[zone_name] = [await backend.run_command(zone, c) for c in commands]

        try:
            async with trio.open_nursery() as nursery:
                for zone in zones:
                    nursery.start_soon(collect, zone.name)
        finally:
            for zone in zones:
                await backend.halt_and_remove(zone)
    for outs in outputs.values():
        # no process of these zones runs here (no log writer): nothing for ps to list
        assert [o.argv for o in outs] == list(HOST_COMMANDS)
        ss = next(o for o in outs if o.name == "ss")
        assert ss.exit_status == 0 and ss.output  # the real command's output
    assert backend.host_commands.runs == len(HOST_COMMANDS)  # once each, for 8 zones
    assert backend.host_commands.shared == 7 * len(HOST_COMMANDS)
