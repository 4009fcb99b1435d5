"""docs/operations.md's first session with curl, run as written against a daemon."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest
import trio

from sledagent._daemon import DaemonConfig, run_daemon
from sledagent.testing import fast_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def first_session() -> str:
    text = DOC.read_text()
    block = re.search(r"<!-- first-session -->\n```sh\n(.*?)```", text, re.S)
    assert block is not None, "docs/operations.md lost its first-session block"
    return block.group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_the_first_session_in_the_operations_doc_works_as_written(tmp_path: Path) -> None:
    script = first_session()
    assert script.startswith("AGENT=http://127.0.0.1:12345\n")
    config = DaemonConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", agent=fast_config())
    shutdown = trio.Event()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            ours = script.replace("AGENT=http://127.0.0.1:12345", f"AGENT={info.api_url}", 1)
            done = await trio.run_process(
                ["bash", "-euo", "pipefail", "-c", ours],
                cwd=tmp_path,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            shutdown.set()
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert '"vmm_state"' in out and "metadata.toml" in out
    assert "manifest.json" in out  # the whole bundle was downloaded and listed
    uuid.UUID(re.findall(r'"bundle_id":"([0-9a-f-]+)"', out)[0])
