"""What the daemon's log tells an operator: the request id of every error answer, what a
failed Nexus delivery failed on, and what a SIGTERM is waiting for. The daemon runs as a
process; its JSON log lines are read from its stderr."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from sledagent.testing import ensure_body_json

CLI = [sys.executable, "-c", "from sledagent._cli import main; main()"]


async def _lines(stream: trio.abc.ReceiveStream, into: list[str], seen: trio.Event) -> None:
    buf = b""
    while chunk := await stream.receive_some():
        buf += chunk
        *done, buf = buf.split(b"\n")
        for line in done:
            into.append(line.decode())
            if '"nexus_retry"' in into[-1]:
                seen.set()


async def test_the_log_names_request_ids_nexus_failures_and_what_shutdown_waits_for(
    tmp_path: Path,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nexus_port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()  # a Nexus that is down: connections are refused
    config = tmp_path / "sledagent.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\ndata_dir = "{tmp_path / "data"}"\n'
        f'nexus_url = "http://127.0.0.1:{nexus_port}"\n'
        "[agent]\nshutdown_drain_s = 6\nnexus_backoff = {initial_s = 0.2, max_s = 0.5}\n"
    )
    lines: list[str] = []
    retried = trio.Event()
    with trio.fail_after(90):
        proc = await trio.lowlevel.open_process(
            [*CLI, "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_lines, proc.stderr, lines, retried)
                first = b""
                while not first.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1)
                    assert chunk, lines
                    first += chunk
                url = first.decode().split()[3]
                async with httpx.AsyncClient(base_url=url) as api:
                    missing = await api.get(f"/vmms/{uuid.uuid4()}/state")
                    assert missing.status_code == 404
                    pid = uuid.uuid4()
                    (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
                    body = {"state": {"type": "running"}}  # a state to publish: Nexus is down
                    (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
                await retried.wait()
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await proc.stdout.aclose()
                await proc.stderr.aclose()
    events: list[dict[str, Any]] = [json.loads(x) for x in lines if x.startswith("{")]
    refused = [e for e in events if e["event"] == "api_refused"]
    assert [(e["request_id"], e["status"], e["error_code"]) for e in refused] == [
        (missing.headers["x-request-id"], 404, "NO_SUCH_INSTANCE")
    ]
    retry = next(e for e in events if e["event"] == "nexus_retry")
    assert retry["status"] is None, retry  # no answer at all, and the error says why:
    assert retry["error"].endswith(f"/vmms/{pid}: connect: connection refused"), retry
    waiting = [e for e in events if e["event"] == "shutdown_waiting_for_nexus"]
    assert len(waiting) >= 2, [e["event"] for e in events]  # at once, then every 5 s
    assert waiting[0]["states_pending"] == 1
    assert waiting[0]["last_error"].endswith("connect: connection refused")
    assert any(e["event"] == "shutdown_drain_timeout" for e in events)
