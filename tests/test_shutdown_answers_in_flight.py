"""SIGTERM / Ctrl-C of the daemon: answers in flight finish (``[http] graceful_s``).

The daemon cancelled its servers as soon as the agent had drained, whatever the API
still had in flight: a bundle download begun before the shutdown was cut short (98 KiB
of 270 KiB over a slow link), with or without the front process. The download here is
made to be in flight by a reader that takes only the head before the shutdown (the rest
cannot fit in the sockets' buffers), not by timing."""

from __future__ import annotations

import gzip
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from sledagent import VmmState
from sledagent._daemon import DaemonConfig, DaemonInfo, run_daemon
from sledagent._http import HttpLimits
from sledagent.testing import ensure_body_json, fast_config

DEADLINE_S = 90


async def _bundle_of_a_stopped_vmm(info: DaemonInfo) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=info.api_url) as api:
        pid = uuid.uuid4()
        (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
        (
            await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
        ).raise_for_status()
        assert info.recording_nexus is not None
        await info.recording_nexus.wait_for(pid, VmmState.RUNNING)
        (
            await api.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
        ).raise_for_status()
        zone = f"oxz_propolis-server_{pid}"
        while not (bundles := (await api.get(f"/zones/bundles/{zone}")).json()):  # noqa: ASYNC110
            await trio.sleep(0.05)  # the reaper bundles it
        return zone, bundles[0]["id"]["bundle_id"]


@pytest.mark.parametrize("front_process", [True, False], ids=["front", "agent-alone"])
async def test_a_bundle_download_in_flight_at_shutdown_finishes_whole(
    tmp_path: Path, front_process: bool
) -> None:
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=tmp_path / "data", log_rate_bps=8192, seed_log_mb=4,
        agent=fast_config(), propolis="sim-inprocess",
        http=HttpLimits(front_process=front_process, graceful_s=30),
    )  # fmt: skip
    shutdown = trio.Event()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            info: DaemonInfo = await nursery.start(run_daemon, config, shutdown)
            zone, bundle_id = await _bundle_of_a_stopped_vmm(info)
            host, port = info.api_url.removeprefix("http://").rsplit(":", 1)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow link
            await sock.connect((host, int(port)))
            await sock.send(
                f"GET /zones/bundles/{zone}/{bundle_id} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
            )
            received = b""
            while b"\r\n\r\n" not in received:
                received += await sock.recv(1024)
            head, body = received.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            assert length > 256 * 1024  # more than the sockets can hold: still being sent
            shutdown.set()
            # Everything the daemon does without this reader is done (or waits for it).
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
            while len(body) < length and (data := await sock.recv(65536)):
                body += data
            sock.close()
    assert len(body) == length
    assert gzip.decompress(body)  # a whole tar.gz
