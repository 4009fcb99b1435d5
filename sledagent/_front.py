"""The front thread: the API's HTTP server on a trio loop of its own, off the agent's.

Why (issues 18 and 21): every state read used to wait for the agent's one trio thread.
While that thread re-adopts 1000 VMMs after a restart (about 3 ms of Python each) or
publishes 1000 halts, a read waited behind whole scheduler batches of that work: reads
p99 0.15-0.57 s during a re-adoption, refusals 0.36 s late under a mass stop. Here the
server (accept, keep-alive, h11, limits, the quick path for state reads) runs on a
second thread with its own trio loop. A state read is answered there from what the
registry has journaled (``Registry.answer``: plain dictionary reads, safe under the GIL)
and never waits for the agent's loop, only for the GIL: at most the interpreter's
switch interval (5 ms) while the agent's thread computes.

Every other request is the app's, run on the agent's loop (``_BridgedApp``): the
front's connection task starts the app there and waits; the app's ``receive`` and
``send`` run back on the front's loop, where the connection's stream lives. Two
``run_sync_soon`` calls cross each way (one wakeup write each), so the app, the
registry and every trio object of the agent stay on the agent's thread; the front
owns only sockets. Cancellation crosses too: a connection cancelled on the front
(client gone, shutdown past its grace) cancels the app's task, and an app cancelled
mid-``send`` cancels that send on the front.

Lifetime: ``serve_front`` runs the front loop in a worker thread for as long as its
caller's task; the caller's shutdown event and its cancellation both reach the front.
No task outlives it: the front's loop ends before ``serve_front`` returns. The daemon
keeps the front only while a start re-adopts its VMMs (``_server.serve_api``'s
``front_until``): with the agent's loop saturated, every syscall of the front waits to
take the GIL back (the convoy effect), and at 2,000 reads/s a read waited longer on
the front than on the agent's own loop (docs/performance.md, "Session 9").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from ._admission import ReadAdmission
from ._http import ASGIApp, HttpLimits, Message, Scope

T = TypeVar("T")

#: How long a cancelled crossing waits for the other side to stop (seconds).
_UNWIND_S = 5.0


class _Loop:
    """One side of the bridge: a loop's token and a nursery in it to run calls in."""

    def __init__(self) -> None:
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.nursery = nursery

    def soon(self, fn: Callable[[], object]) -> bool:
        """Run ``fn`` on this loop soon; False if the loop has ended (nothing runs)."""
        if self.token is None:
            return False
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True


@attrs.define
class _Call:
    """One call made on the other loop: its outcome and how to cancel it."""

    done: trio.Event
    value: Any = None
    error: BaseException | None = None
    scope: trio.CancelScope | None = None
    cancel_asked: bool = False

    def cancel(self) -> None:  # on the loop that runs the call
        self.cancel_asked = True
        if self.scope is not None:
            self.scope.cancel()


async def _cross(here: _Loop, there: _Loop, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` on loop ``there`` and wait for it on loop ``here`` (the caller's).

    Exceptions come back as they were (``Cancelled`` never crosses: a call cancelled
    there without being asked to ends with ``ClosedResourceError``). Cancelling the
    caller cancels the call and waits, shielded, up to ``_UNWIND_S`` for it to end."""
    call = _Call(done=trio.Event())

    async def run() -> None:  # on ``there``
        try:
            with trio.CancelScope() as scope:
                call.scope = scope
                if call.cancel_asked:
                    scope.cancel()
                try:
                    call.value = await fn()
                except trio.Cancelled:
                    call.error = trio.ClosedResourceError("the other side of the bridge stopped")
                    raise
                except Exception as exc:
                    call.error = exc  # handed back whole to the caller
            if scope.cancelled_caught and call.error is None:
                call.error = trio.ClosedResourceError("the other side of the bridge stopped")
        finally:
            here.soon(call.done.set)

    def start() -> None:
        assert there.nursery is not None
        there.nursery.start_soon(run)

    if not there.soon(start):
        raise trio.ClosedResourceError("the other side of the bridge has stopped")
    try:
        await call.done.wait()
    except trio.Cancelled:
        if there.soon(call.cancel):
            with trio.move_on_after(_UNWIND_S, shield=True):
                await call.done.wait()
        raise
    if call.error is not None:
        raise call.error
    return call.value  # type: ignore[no-any-return]


class _BridgedApp:
    """Runs ``app`` on the agent's loop for a server on the front loop (module doc)."""

    def __init__(self, app: ASGIApp, agent_side: _Loop, front_side: _Loop) -> None:
        self.app = app
        self.agent, self.front = agent_side, front_side
        # The server takes the quick path from its app (``_http.QuickGet``): the same
        # function, run on the front loop (it reads only what is safe off the thread).
        self.quick_get = getattr(app, "quick_get", None)

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        agent, front = self.agent, self.front

        async def receive_there() -> Message:  # on the agent's loop
            return await _cross(agent, front, receive)

        async def send_there(message: Message) -> None:
            await _cross(agent, front, lambda: send(message))

        await _cross(front, agent, lambda: self.app(scope, receive_there, send_there))


def watch_agent_loop(app: ASGIApp, *, front: bool = True) -> None:
    """Tell the app's read admission, if it has one, whether a front decides reads.

    While a front serves (a start re-adopting its VMMs) a read costs the agent's loop
    nothing but its share of the GIL, and is answered from the journal at once (issue
    18: "answers its journaled state at once"): "publication first" is off (the
    agent's lag counts as 0; re-adoption's first monitor answers would otherwise count
    as a publication backlog and shed reads at start); only the front's own lag can
    make a read ``late``. With ``front=False``, one loop decides both again."""
    admission = getattr(app, "admission", None)
    if isinstance(admission, ReadAdmission):
        admission.busy = _no_lag if front else None


def _no_lag() -> float:
    return 0.0


def duplicate_listeners(listeners: list[trio.SocketListener]) -> list[int]:
    """New descriptors for the listening sockets of ``listeners`` (``dup``), for the
    front's loop: the kernel hands each connection to one ``accept``, whichever loop
    makes it, and closing a copy leaves the other listening."""
    return [os.dup(listener.socket.fileno()) for listener in listeners]


ServeListeners = Callable[..., Awaitable[None]]


async def serve_front(
    serve: ServeListeners,
    app: ASGIApp,
    fds: list[int],
    *,
    shutdown: trio.Event,
    limits: HttpLimits,
    announce: bool,
    retire: Callable[[], bool] | None = None,
) -> None:
    """Serve ``app`` on the listening descriptors ``fds`` from a front loop in a thread
    of its own, until ``shutdown`` (graceful, as ``serve``) or cancellation (at once).

    ``serve(app, listeners, shutdown=, limits=, announce=, retire=)`` is the server
    (``_server``'s ``serve_listeners``), run on the front loop. Raises what it raises."""
    agent_side, front_side = _Loop(), _Loop()
    bridged = _BridgedApp(app, agent_side, front_side)
    ready = trio.Event()  # set on the agent's loop once the front serves
    front_shutdown = trio.Event()  # waited on and set only on the front loop
    stop_scope: list[trio.CancelScope] = []
    stopping: list[bool] = []  # the caller was cancelled: the front stops at once
    owned: list[bool] = []  # the front loop took the descriptors (it closes them)

    async def front_main() -> None:  # the front loop's root task
        owned.append(True)
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            for fd in fds
        ]
        with trio.CancelScope() as scope:
            # Either this sees ``stopping`` or ``relay`` sees the scope (GIL-ordered).
            stop_scope.append(scope)
            if stopping:
                scope.cancel()
            async with trio.open_nursery() as calls:
                front_side.bind(calls)
                agent_side.soon(ready.set)
                await serve(
                    bridged,
                    listeners,
                    shutdown=front_shutdown,
                    limits=limits,
                    announce=announce,
                    retire=retire,
                )
                calls.cancel_scope.cancel()

    async def relay() -> None:  # on the agent's loop: its shutdown and cancel, to the front
        try:
            await ready.wait()
            await shutdown.wait()
            front_side.soon(front_shutdown.set)
            await trio.sleep_forever()
        finally:
            stopping.append(True)
            if stop_scope:
                front_side.soon(stop_scope[0].cancel)

    async with trio.open_nursery() as nursery:
        agent_side.bind(nursery)  # the app's tasks run here, on the agent's loop
        nursery.start_soon(relay)
        try:
            await trio.to_thread.run_sync(
                trio.run, front_main, limiter=trio.CapacityLimiter(1), abandon_on_cancel=False
            )
        finally:
            for fd in fds if not owned else ():
                _close_quietly(fd)
        nursery.cancel_scope.cancel()


def _close_quietly(fd: int) -> None:
    try:
        socket.socket(fileno=fd).close()
    except OSError:
        pass
