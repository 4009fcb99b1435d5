"""For hosts where only some ports are open: the embedded Nexus and the simulated
Propolis servers listen where the config says (``nexus_listen``, ``sim_propolis_listen``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import trio

from sledagent import VmmState
from sledagent._daemon import DaemonConfig, run_daemon
from sledagent.testing import ensure_body_json, fast_config


async def _free_port() -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    return port


async def test_the_embedded_nexus_and_each_sim_propolis_listen_where_configured(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        nexus_port = await _free_port()
        # The first port of the Propolis range is taken: the next free ones are used.
        taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
        first = taken[0].socket.getsockname()[1]
        config = DaemonConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            nexus_listen=f"127.0.0.1:{nexus_port}",
            sim_propolis_listen=f"127.0.0.1:{first}",
            agent=fast_config(),
        )
        shutdown = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(run_daemon, config, shutdown)
                assert info.nexus_url == f"http://127.0.0.1:{nexus_port}"
                nexus = info.recording_nexus
                assert nexus is not None
                pids = [uuid.uuid4() for _ in range(2)]
                async with httpx.AsyncClient(base_url=info.api_url) as api:
                    for pid in pids:
                        (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
                        body = {"state": {"type": "running"}}
                        (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
                for pid in pids:
                    await nexus.wait_for(pid, VmmState.RUNNING)  # through the sim Propolis
                # Where each zone's Propolis listens (the sim host records it in the zone).
                metas = (tmp_path / "data" / "zones").glob("*/zone.json")
                addrs = [json.loads(m.read_text())["propolis_addr"] for m in metas]
                ports = sorted(int(addr.rsplit(":", 1)[1]) for addr in addrs)
                shutdown.set()
        finally:
            for listener in taken:
                await listener.aclose()
    assert len(ports) == 2 and first < ports[0] < ports[1] <= first + 64, (first, ports)
