"""`sledagent run --config FILE` with flags: each flag given wins over the file's key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio


async def test_flags_override_the_config_file(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        # The file's listen address is in use: a daemon that used it would not start.
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "sledagent.toml"
        config.write_text(
            f'listen = "127.0.0.1:{port}"\n'
            f'data_dir = "{tmp_path / "from-file"}"\n'
            'nexus_url = "http://127.0.0.1:9"\n'
        )
        argv = [
            sys.executable, "-c", "from sledagent._cli import main; main()", "run",
            "--config", str(config), "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path / "from-flag"), "--nexus", "http://127.0.0.1:8",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with trio.fail_after(60):
            proc = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
            )
            try:
                assert proc.stdout is not None
                buf = b""
                while b"\n" not in buf:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, "the daemon exited before listening"
                    buf += chunk
                line = buf.split(b"\n", 1)[0].decode()
                # sledagent listening on http://127.0.0.1:<port> (Nexus: <url>)
                _, _, _, url, _, nexus = line.split()
                assert url.startswith("http://127.0.0.1:") and not url.endswith(f":{port}")
                assert nexus == "http://127.0.0.1:8)"
                async with httpx.AsyncClient(base_url=url) as api:
                    assert (await api.get("/zones")).json() == []
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()
    assert (tmp_path / "from-flag").is_dir()
    assert not (tmp_path / "from-file").exists()
