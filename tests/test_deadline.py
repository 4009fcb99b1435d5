"""The plugin's real-time deadline: a test that hangs fails with its name, the next test
runs; on a ``MockClock`` whose virtual time runs forever too. Each case runs pytest in a
process of its own (``pytester``), with short deadlines."""

from __future__ import annotations

import pytest

INI = """
[pytest]
trio_mode = true
addopts = -p no:anyio -p no:cacheprovider -p no:schemathesis -p no:hypothesispytest
sledagent_deadline_s = {deadline}
sledagent_deadline_grace_s = {grace}
"""

HANGS = """
import time

import pytest
import trio

from sledagent import VmmState


@pytest.mark.deadline_s(3)  # room to start the VMM on a loaded machine: it hangs after
async def test_a_vmm_that_never_halts(fake_agent, autojump_clock):
    # Periodic work keeps the virtual clock jumping: without a real-time deadline this
    # ran until an outer `timeout` killed pytest, naming nothing.
    pid = await fake_agent.start_vmm()
    await fake_agent.fakes.nexus.wait_for(pid, VmmState.DESTROYED)


async def test_a_real_time_wait_that_never_ends():
    await trio.sleep_forever()


def test_a_synchronous_test_that_never_ends():
    time.sleep(3600)


@pytest.mark.deadline_s(60)
async def test_a_test_given_longer_passes():
    await trio.sleep(1.5)


async def test_the_next_test_runs():
    await trio.sleep(0)
"""


def test_hanging_tests_fail_by_name_and_the_rest_of_the_run_goes_on(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI.format(deadline=3600, grace=30))
    pytester.makepyfile(test_hangs=HANGS)
    # (and the command line's deadline overrides the ini file's)
    result = pytester.runpytest_subprocess("-v", "--deadline-s", "1", timeout=120)
    result.assert_outcomes(failed=3, passed=2)
    out = result.stdout.str()
    for name, deadline in (
        ("test_a_vmm_that_never_halts", 3),
        ("test_a_real_time_wait_that_never_ends", 1),
        ("test_a_synchronous_test_that_never_ends", 1),
    ):
        expected = f"test_hangs.py::{name} did not finish within its real-time deadline of"
        assert f"{expected} {deadline} s" in out
    # Where the trio test waited: the fake Nexus's wait, called from the test.
    assert "in wait_for <- test_hangs.py" in out
    assert "test_hangs.py::test_a_test_given_longer_passes PASSED" in out
    assert "test_hangs.py::test_the_next_test_runs PASSED" in out


def test_a_test_that_cannot_be_interrupted_ends_the_run_naming_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI.format(deadline=1, grace=1))
    pytester.makepyfile(
        test_blocked="""
import time

async def test_blocks_the_trio_thread():
    time.sleep(3600)  # no checkpoint: cancellation cannot reach it
"""
    )
    result = pytester.runpytest_subprocess(timeout=120)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    err = result.stderr.str()
    assert "test_blocked.py::test_blocks_the_trio_thread: still running 2 s after it started" in err
    assert "in test_blocks_the_trio_thread" in err  # its stack, from faulthandler
