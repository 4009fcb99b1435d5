"""schemathesis against the daemon's served OpenAPI document, on the real wire.

Starts ``sledagent run`` (the embedded default: local zones, simulated Propolis,
recording Nexus) as a process of its own on a fresh data directory, runs every
schemathesis phase (coverage, fuzzing, stateful: register a VMM, drive it, read it,
unregister it, via the document's links) with every check, then stops the daemon with
SIGTERM. Passes only if schemathesis found nothing (no 5xx, no undocumented status, no
answer off its schema, no schema-valid request refused beyond the exceptions in
``tests/schemathesis/schemathesis.toml``), the daemon logged no internal error and it
exited 0.

CI runs a small fixed budget (``tests/test_schemathesis.py``); ``scripts/fuzz-api``
runs a larger one: ``scripts/fuzz-api --examples 500 --seed 7``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from sledagent.sim._spawn import read_state

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "schemathesis" / "schemathesis.toml"


@attrs.frozen
class FuzzResult:
    returncode: int
    output: str
    daemon_exit: int | None
    daemon_log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.daemon_exit == 0 and "api_error" not in self.daemon_log


def _schemathesis() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("schemathesis is not installed (pip install -e '.[test]')")
    return found


def run_fuzz(*, examples: int, seed: int, max_time_s: int | None = None) -> FuzzResult:
    with tempfile.TemporaryDirectory(prefix="sledagent-fuzz-") as tmp:
        root = Path(tmp)
        config = root / "sledagent.toml"
        config.write_text(f'listen = "127.0.0.1:0"\ndata_dir = "{root / "data"}"\n')
        log = root / "daemon.log"
        argv = [sys.executable, "-c", "from sledagent._cli import main; main()",
                "run", "--config", str(config)]  # fmt: skip
        with log.open("wb") as err:
            daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        try:
            assert daemon.stdout is not None
            line = daemon.stdout.readline().decode()  # "sledagent listening on <url> ..."
            if not line.startswith("sledagent listening on "):
                raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")
            url = line.split()[3]
            st = [_schemathesis(), "--config-file", str(CONFIG), "--no-color", "run",
                  f"{url}/openapi.json", "--checks", "all", "--max-examples", str(examples),
                  "--seed", str(seed), "--workers", "1",
                  "--generation-database", "none"]  # fmt: skip
            if max_time_s is not None:
                st += ["--max-time", str(max_time_s)]
            env = {**os.environ, "NO_COLOR": "1"}
            # In the temporary directory: schemathesis keeps a cache where it runs.
            done = subprocess.run(
                st, capture_output=True, text=True, env=env, cwd=root, check=False
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon_exit: int | None = daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
                daemon_exit = None
            if daemon.stdout is not None:
                daemon.stdout.close()
            # The simulated guests outlive the daemon by design; their host rewrites its
            # state file in the data directory each second: stopped before the directory
            # is removed (else its removal races that write: "Directory not empty").
            host = read_state(root / "data")
            if host is not None:
                host.kill()
        return FuzzResult(done.returncode, done.stdout + done.stderr, daemon_exit, log.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="test cases per operation")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-time", type=int, default=None, help="whole seconds, in all (schemathesis's)"
    )
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    result = run_fuzz(examples=args.examples, seed=args.seed, max_time_s=args.max_time)
    print(result.output)
    errors = [line for line in result.daemon_log.splitlines() if "api_error" in line]
    print(f"daemon exit status: {result.daemon_exit}; internal errors logged: {len(errors)}")
    print(f"fuzz-api: {'passed' if result.ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
