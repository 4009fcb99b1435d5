"""``sledagent sim``: the simulated peers in a process of their own.

Serves a recording Nexus and a fleet controller from which an agent (``propolis =
"remote"``) launches one simulated Propolis server per zone:

- ``POST /fleet/zones/{zone_name}[?addr=host:port]`` -> ``{"addr": "host:port"}``
  (idempotent): that zone's Propolis, listening at ``addr`` when it can be bound here
  (the ``propolis_addr`` Nexus registered), else on an ephemeral loopback port; an
  optional body ``{"log_dir", "archive_dir", "rate_bps", "rotate_bytes", "keep"}`` makes
  that Propolis write its log into the zone (paths on this machine);
- ``DELETE /fleet/zones/{zone_name}``: stop that zone's Propolis (``?kill=true``: its
  process dies, connections cut unanswered, the zone left in place);
- ``POST /fleet/halt`` with ``["zone", ...]``: those guests power off at the same instant;
  answers ``{zone: halted_at}`` on this process's clock, the clock of the Nexus's
  ``GET /sim/updates``, so a benchmark can measure halt -> publish across processes;
- ``POST /fleet/lease``: an agent using this host says it is alive (see below).

Running the peers apart keeps their CPU off the agent's trio thread, and lets the
guests outlive the agent: the daemon's embedded default (``propolis = "sim"``) runs
its simulated Propolis fleet (and, with no ``nexus_url``, its recording Nexus) in such
a process, spawned on first need and found again at the next start through a state file
in the data directory (``sim/_spawn.py``), as a real sled's Propolis zones outlive a
restart of its sled agent. With ``idle_exit_s`` the host exits by itself once it serves
no Propolis and no agent has renewed its lease for that long, so a demo leaves nothing
running once its guests are gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._failures import ListenError, StartupError, os_reason
from .._h1client import ConnectionFailed, H1Pool
from .._local_zones import LogSpec
from .._preflight import listen_reason
from .._server import serve_api
from ..testing._nexus import FakeNexus
from ._fleet import SimPropolisFleet
from ._nexus import recording_nexus_app

#: A launch or retire that takes longer means the sim host is stuck.
_TIMEOUT_S = 30.0


def fleet_app(fleet: SimPropolisFleet, *, on_lease: Callable[[], None] = lambda: None) -> Starlette:
    async def launch(request: Request) -> Response:
        raw = await request.body()
        try:
            logs = LogSpec(**json.loads(raw)) if raw else None
        except (ValueError, TypeError) as exc:
            return JSONResponse({"message": f"bad log spec: {exc}"}, 400)
        zone, addr = request.path_params["zone_name"], request.query_params.get("addr")
        return JSONResponse({"addr": await fleet.launch(zone, logs, addr=addr)})

    async def lease(request: Request) -> Response:
        on_lease()
        return JSONResponse({"pid": os.getpid(), "propolis": len(fleet)})

    async def retire(request: Request) -> Response:
        if request.query_params.get("kill") == "true":
            fleet.kill(request.path_params["zone_name"])
            await fleet.logs.settled()
        else:
            await fleet.retire(request.path_params["zone_name"])
        return Response(status_code=204)

    async def halt(request: Request) -> Response:
        try:
            zones = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"message": "expected a JSON list of zone names"}, 400)
        halted = {}
        for name in zones:  # no await in between: the same instant for all of them
            vm = fleet.vm(name)
            if vm is not None:
                vm.halt()
                halted[name] = vm.halted_at
        return JSONResponse(halted)

    return Starlette(
        routes=[
            Route("/fleet/zones/{zone_name}", launch, methods=["POST"]),
            Route("/fleet/zones/{zone_name}", retire, methods=["DELETE"]),
            Route("/fleet/halt", halt, methods=["POST"]),
            Route("/fleet/lease", lease, methods=["POST"]),
        ]
    )


async def run_sim_host(
    *,
    nexus_listen: str = "127.0.0.1:0",
    fleet_listen: str = "127.0.0.1:0",
    propolis_listen: str = "127.0.0.1:0",
    shutdown: trio.Event,
    state_file: Path | None = None,
    idle_exit_s: float | None = None,
    task_status: trio.TaskStatus[tuple[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the recording Nexus and the fleet until ``shutdown``; reports both URLs.

    ``state_file``: where to write ``{"pid", "nexus_url", "fleet_url"}`` once serving
    (atomically; removed at exit), for an agent to find this host again. ``idle_exit_s``:
    exit once no Propolis has run and no lease was renewed for that long."""
    last_lease = trio.current_time()

    def renewed() -> None:
        nonlocal last_lease
        last_lease = trio.current_time()

    async with trio.open_nursery() as nursery:
        fleet = SimPropolisFleet(listen=propolis_listen)
        await nursery.start(fleet.run)
        nexus_url = await _serve(nursery, recording_nexus_app(FakeNexus()), nexus_listen, shutdown)
        fleet_url = await _serve(
            nursery, fleet_app(fleet, on_lease=renewed), fleet_listen, shutdown
        )
        state = {"pid": os.getpid(), "nexus_url": nexus_url, "fleet_url": fleet_url}
        if state_file is not None:
            # Held for the host's life: an agent that cannot read the state file still
            # knows a host serves this data dir, and never starts a second one.
            try:
                lock = await trio.to_thread.run_sync(_hold_lock, state_file)
                nursery.start_soon(_keep_lock_open, lock)
                await trio.to_thread.run_sync(_write_state, state_file, state)
            except OSError as exc:
                raise StartupError(
                    f"--state-file {state_file}: cannot write: {os_reason(exc)}"
                ) from None
        task_status.started((str(nexus_url), str(fleet_url)))
        try:
            while not shutdown.is_set():
                with trio.move_on_after(1.0 if idle_exit_s is None else min(1.0, idle_exit_s)):
                    await shutdown.wait()
                if state_file is not None:  # deleted or garbled: written again
                    await trio.to_thread.run_sync(_restore_state, state_file, state)
                if idle_exit_s is None:
                    continue
                if len(fleet):
                    renewed()  # guests run: never idle
                elif trio.current_time() - last_lease >= idle_exit_s:
                    break
        finally:
            nursery.cancel_scope.cancel()
            if state_file is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_remove_state, state_file)


async def _serve(nursery: trio.Nursery, app: Starlette, listen: str, shutdown: trio.Event) -> str:
    """Serve ``app`` at ``listen``; its URL. Cannot bind: ``ListenError`` (one line,
    ``cannot listen on 127.0.0.1:12345: address already in use``), as the agent's own."""
    try:
        binds = await nursery.start(
            lambda task_status: serve_api(
                app, listen=listen, shutdown=shutdown, task_status=task_status
            )
        )
    except OSError as exc:  # raised before serving: nothing else to unwind
        raise ListenError(listen, listen_reason(exc)) from None
    return str(binds[0])


def _write_state(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


class SimHostBusy(StartupError):
    """Another simulated host serves this data directory (one line)."""


def lock_path(state_file: Path) -> Path:
    return state_file.with_name(f"{state_file.name}.lock")


def _hold_lock(state_file: Path) -> int:
    fd = os.open(lock_path(state_file), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SimHostBusy(f"another simulated host holds {lock_path(state_file)}") from None
    return fd


async def _keep_lock_open(fd: int) -> None:
    try:
        await trio.sleep_forever()
    finally:
        os.close(fd)


def _restore_state(path: Path, state: dict[str, object]) -> None:
    try:
        if json.loads(path.read_text()) == state:
            return
    except (OSError, ValueError):
        pass
    _write_state(path, state)


def _remove_state(path: Path) -> None:
    """Remove the state file if it still names this process (a new host may have
    replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


class RemoteFleetLauncher:
    """A ``PropolisLauncher`` backed by a ``sledagent sim`` process's fleet controller.

    Who starts it: the daemon (``run``), which closes its pool at the end. It
    speaks through an ``H1Pool``, not httpx: it runs on the agent's trio thread, and at
    1000 VMMs its launches and retires cost as much CPU there as the agent's own work.
    """

    def __init__(self, fleet_url: str, *, max_connections: int = 32) -> None:
        self._pool = H1Pool(fleet_url, max_connections=max_connections, max_idle=max_connections)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._pool.aclose()

    async def launch(
        self, zone_name: str, logs: LogSpec | None = None, *, addr: str | None = None
    ) -> str:
        body = b""
        headers: list[tuple[str, str]] = []
        if logs is not None:
            spec = {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(logs).items()}
            body = json.dumps(spec).encode()
            headers.append(("content-type", "application/json"))
        target = f"/fleet/zones/{zone_name}"
        if addr:
            target += f"?addr={urllib.parse.quote(addr)}"
        response = await self._pool.request(
            "POST", target, body, headers=headers, timeout_s=_TIMEOUT_S
        )
        if response.status != 200:
            raise ConnectionFailed(
                f"POST {self._pool.base_url}{target}: {response.status} {response.body[:200]!r}"
            )
        try:
            return str(json.loads(response.body)["addr"])
        except (ValueError, TypeError, KeyError):  # a malformed answer: a fault of the sim host
            raise ConnectionFailed(
                f"POST {self._pool.base_url}{target}: no address in {response.body[:200]!r}"
            ) from None

    async def retire(self, zone_name: str) -> None:
        try:
            await self._pool.request("DELETE", f"/fleet/zones/{zone_name}", timeout_s=_TIMEOUT_S)
        except ConnectionFailed:
            pass  # the sim host is gone: nothing left to stop
