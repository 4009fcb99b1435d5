"""A real-time deadline for every test, so that a hang fails with the test's name.

Each test gets a watchdog thread. When the test's deadline passes (real time, whatever
clock the test runs on), the watchdog interrupts it:

- a trio test (pytest-trio) is cancelled through its run's ``TrioToken``: its own
  cleanup runs (shielded drains included, on the test's clock), and it fails naming the
  deadline and where each of its tasks was waiting. A ``MockClock`` test whose virtual
  time never stops (periodic work keeps the autojump going) ends all the same;
- a synchronous test is interrupted by ``SIGALRM`` in the main thread (as pytest-timeout's
  ``signal`` method does), and fails;
- a test that cannot be interrupted (a blocking call on the trio thread, a shielded wait
  that never ends) gets a grace period; then the watchdog prints the test's name and every
  thread's stack to the terminal and ends the process (exit status 2, "interrupted").

Why not pytest-timeout: its ``signal`` method raises from a signal handler wherever the
main thread is, which inside trio's run loop can land in trio's own bookkeeping rather
than in the test; its ``thread`` method ends the whole session at the first expiry. A
trio test can be cancelled properly, from the outside, through its token; only the
last resort ends the process.

A trio test run by hypothesis (``@given`` on an ``async def``) is run by pytest-trio
with ``trio.run`` itself, out of this plugin's reach: it gets only the last resort.

Configuration: ``sledagent_deadline_s`` (ini, default 300; 0 turns it off),
``--deadline-s`` (overrides the ini value), ``@pytest.mark.deadline_s(seconds)`` on a
test that needs longer, ``sledagent_deadline_grace_s`` (ini, default 30). Off under
``--pdb`` and ``--trace``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

DEFAULT_DEADLINE_S = 300.0
DEFAULT_GRACE_S = 30.0
_RECHECK_S = 0.5  # after expiry: how often the watchdog looks for a phase to interrupt
_MAX_TASKS_REPORTED = 40
#: Frames left out of the report of where a trio test waited: the machinery around it.
_NOT_REPORTED = ("/trio/", "/pytest_trio/", "/_deadline.py")


class _Watch:
    """One test's watchdog: a thread that sleeps until the deadline, then interrupts."""

    def __init__(self, nodeid: str, limit_s: float, grace_s: float, report_fd: int) -> None:
        self.nodeid = nodeid
        self.limit_s = limit_s
        self.grace_s = grace_s
        self.expired = False
        #: Where the trio test's tasks were waiting when it was cancelled.
        self.where = ""
        self._report_fd = report_fd
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._trio: tuple[trio.lowlevel.TrioToken, Callable[[], None]] | None = None
        self._sync = False
        self._thread = threading.Thread(target=self._watch, name=f"deadline: {nodeid}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def failure(self) -> BaseException:
        message = (
            f"{self.nodeid} did not finish within its real-time deadline of "
            f"{self.limit_s:g} s (ini `sledagent_deadline_s`, or "
            "`@pytest.mark.deadline_s(seconds)` on a test that needs longer)"
        )
        if self.where:
            message += f"; where its tasks were waiting:\n{self.where}"
        return pytest.fail.Exception(message, pytrace=False)

    # --- phases the watchdog can interrupt ------------------------------------------

    def enter_trio(self, token: trio.lowlevel.TrioToken, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._trio = (token, cancel)

    def leave_trio(self) -> None:
        with self._lock:
            self._trio = None

    @contextlib.contextmanager
    def sync_phase(self) -> Iterator[None]:
        with self._lock:
            self._sync = True
        try:
            yield
        finally:
            with self._lock:
                self._sync = False

    def interruptible_now(self) -> bool:
        """For the SIGALRM handler: expired, and in a synchronous phase."""
        return self.expired and self._sync

    # --- the thread --------------------------------------------------------------------

    def _watch(self) -> None:
        if self._done.wait(self.limit_s):
            return
        self.expired = True
        interrupted: object = None  # the phase already interrupted (once each)
        end = _now() + self.grace_s
        while True:
            with self._lock:
                if self._trio is not None and interrupted is not self._trio:
                    interrupted = self._trio
                    token, cancel = self._trio
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(cancel)
                elif self._sync and interrupted != "sync" and hasattr(signal, "pthread_kill"):
                    interrupted = "sync"
                    main = threading.main_thread().ident
                    if main is not None:
                        signal.pthread_kill(main, signal.SIGALRM)
            left = end - _now()
            if left <= 0 or self._done.wait(min(_RECHECK_S, left)):
                break
        if not self._done.is_set():
            self._abort()

    def _abort(self) -> None:
        """The test could not be interrupted: name it, show every stack, end the run."""
        banner = (
            f"\n\n*** {self.nodeid}: still running {self.limit_s + self.grace_s:g} s after "
            f"it started (deadline {self.limit_s:g} s, then {self.grace_s:g} s for it to "
            "end once interrupted); ending the test run. Stacks of every thread:\n"
        )
        with contextlib.suppress(OSError):
            os.write(self._report_fd, banner.encode())
            faulthandler.dump_traceback(file=self._report_fd, all_threads=True)
        os._exit(int(pytest.ExitCode.INTERRUPTED))


def _now() -> float:
    return time.monotonic()


def _task_report() -> str:
    """Each trio task and the innermost frames it waits in, outside trio and pytest-trio
    (run in the trio thread)."""
    lines: list[str] = []
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        for nursery in reversed(task.child_nurseries):
            stack.extend(sorted(nursery.child_tasks, key=lambda t: t.name, reverse=True))
        frames = [
            f"{Path(frame.f_code.co_filename).name}:{lineno} in {frame.f_code.co_name}"
            for frame, lineno in task.iter_await_frames()
            if not any(part in frame.f_code.co_filename for part in _NOT_REPORTED)
        ]
        if frames:
            lines.append(f"  {task.name}: " + " <- ".join(reversed(frames[-3:])))
    if len(lines) > _MAX_TASKS_REPORTED:
        lines[_MAX_TASKS_REPORTED:] = [f"  ... and {len(lines) - _MAX_TASKS_REPORTED} more"]
    return "\n".join(lines)


def _guarded_run(watch: _Watch, run: Callable[..., Any]) -> Callable[..., Any]:
    """A ``trio.run`` for pytest-trio that the watchdog can cancel from its thread."""

    def guarded_run(async_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def main() -> Any:
            scope = trio.CancelScope()

            def cancel() -> None:  # in the trio thread, from the watchdog
                watch.where = _task_report()
                scope.cancel()

            watch.enter_trio(trio.lowlevel.current_trio_token(), cancel)
            try:
                with scope:
                    return await async_fn(*args)
            except BaseException as exc:
                if watch.expired:  # whatever the cancellation turned into
                    raise watch.failure() from exc
                raise
            finally:
                watch.leave_trio()
            raise watch.failure()  # cancelled by the watchdog, and nothing else happened

        return run(main, **kwargs)

    return guarded_run


# --- the pytest hooks (registered by the ``sledagent`` plugin) ---------------------------

_WATCH = pytest.StashKey[_Watch]()
_REPORT_FD = pytest.StashKey[int]()
_current: _Watch | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "sledagent_deadline_s",
        "real-time deadline of each test in seconds (0: none)",
        default=str(DEFAULT_DEADLINE_S),
    )
    parser.addini(
        "sledagent_deadline_grace_s",
        "seconds an interrupted test has to end before the run is stopped",
        default=str(DEFAULT_GRACE_S),
    )
    parser.getgroup("sledagent").addoption(
        "--deadline-s",
        type=float,
        default=None,
        help="real-time deadline of each test in seconds (0: none); overrides the ini value",
    )


def _on_alarm(signum: int, frame: object) -> None:
    watch = _current
    if watch is not None and watch.interruptible_now():
        raise watch.failure()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deadline_s(seconds): this test's real-time deadline, instead of sledagent_deadline_s",
    )
    # The terminal, kept for the last resort's report (fd 2 is captured during tests).
    config.stash[_REPORT_FD] = os.dup(2)
    if hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGALRM, _on_alarm)

        def restore() -> None:
            signal.signal(signal.SIGALRM, previous)

        config.add_cleanup(restore)
    config.add_cleanup(lambda: os.close(config.stash[_REPORT_FD]))


def _limit_s(item: pytest.Item) -> float:
    config = item.config
    if config.getoption("usepdb", False) or config.getoption("trace", False):
        return 0.0
    marker = item.get_closest_marker("deadline_s")
    if marker is not None:
        return float(marker.args[0])
    option = config.getoption("deadline_s", None)
    if option is not None:
        return float(option)
    return float(config.getini("sledagent_deadline_s"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    global _current
    limit = _limit_s(item)
    if limit <= 0:
        return (yield)
    grace = float(item.config.getini("sledagent_deadline_grace_s"))
    watch = _Watch(item.nodeid, limit, grace, item.config.stash[_REPORT_FD])
    item.stash[_WATCH] = watch
    _current = watch
    watch.start()
    try:
        return (yield)
    finally:
        watch.stop()
        _current = None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    watch = item.stash.get(_WATCH, None)
    if watch is None:
        return (yield)
    obj = getattr(item, "obj", None)
    if item.get_closest_marker("trio") is not None and not hasattr(obj, "hypothesis"):
        # pytest-trio runs the test with the ``run`` of the first ``trio`` marker that
        # names one; this one, first, wraps whichever it would have used.
        run: Callable[..., Any] = trio.run
        for marker in item.iter_markers("trio"):
            if marker.kwargs.get("run") is not None:
                run = marker.kwargs["run"]
                break
        item.add_marker(pytest.mark.trio(run=_guarded_run(watch, run)), append=False)
        return (yield)
    with watch.sync_phase():
        return (yield)
