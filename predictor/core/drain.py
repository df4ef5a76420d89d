"""Shutdown and in-flight state shared by the HTTP guard (which admits calls) and the batcher.

What happens on SIGTERM, in order:
1. `Drain.begin`: readiness and every new prediction call get 503 `shutting_down` (with
   `Connection: close`), on new connections and on already-open keep-alive ones alike.
2. The listener stays open and open connections stay up while admitted calls are in flight, so every
   request that arrives meanwhile gets that answer instead of a connection closed with none.
3. When no admitted call is left (or after --drain_timeout_s), the server's own handler (uvicorn's
   graceful exit) runs: it closes the listener, closes idle connections, waits for the rest and exits.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from predictor.core import metrics

log = logging.getLogger("predictor")
_POLL_S = 0.05


class Drain:
    """One process's shutdown state and admitted-call count, shared by the guard (which admits calls
    and counts them), the batcher (which reads the count) and the app's lifespan (SIGTERM).

    Once draining, readiness and new prediction calls get 503 while admitted ones finish. The model
    itself stays ready: admitted calls (v1/v2 included, which KServe checks against the model's
    readiness) must complete. Liveness stays 200 so the kubelet does not kill the drain.
    """

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._handing_over: "asyncio.Task | None" = None

    def __getstate__(self) -> dict:
        return {}  # a worker process starts with its own, fresh state

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def calls_in_flight(self) -> int:
        return self.in_flight

    @contextmanager
    def admitted(self, reserved: bool = False) -> Iterator[None]:
        """One admitted prediction call (HTTP or gRPC) while it runs: counted in flight here and in
        predictor_in_flight_requests (from `reserve`, when its place was reserved at admission)."""
        if not reserved:
            self.reserve()
        try:
            yield
        finally:
            self.release()

    def reserve(self) -> None:
        """Count a call in flight from the moment it is admitted (HTTP's front door admits a call a loop
        turn before it runs: the next head must already see it); `admitted(reserved=True)` or `release`
        ends it."""
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()

    def release(self) -> None:
        self.in_flight -= 1
        metrics.IN_FLIGHT.dec()

    def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("SIGTERM: draining; readiness is now 503, %d admitted request(s) in flight", self.in_flight)

    def chain_signal_handler(self, timeout_s: float) -> None:
        """On SIGTERM: `begin` at once; the handler the server installed (uvicorn's graceful exit) only
        once the admitted calls are done, at most `timeout_s` later. A second SIGTERM hands over at once.

        Call it from the running event loop, after the server has installed its handler.
        """
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def hand_over(signum, frame) -> None:
            if callable(previous):
                previous(signum, frame)

        async def hand_over_when_drained(signum, frame) -> None:
            deadline = time.monotonic() + timeout_s
            while self.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
            if self.in_flight > 0:
                log.warning("drain: %d admitted request(s) still in flight after %g s; stopping anyway",
                            self.in_flight, timeout_s)
                _shorten_server_grace(previous)
            else:
                log.info("drain: no admitted request left; closing the listener and idle connections")
            hand_over(signum, frame)

        def on_sigterm(signum, frame) -> None:
            if self.draining:
                hand_over(signum, frame)
                return
            self.begin()
            # Signal handlers run between two bytecodes of the loop's thread: schedule, never await here.
            loop.call_soon_threadsafe(self._start_hand_over, loop, hand_over_when_drained(signum, frame))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start_hand_over(self, loop: asyncio.AbstractEventLoop, coroutine) -> None:
        self._handing_over = loop.create_task(coroutine)  # kept referenced until it is done


def _shorten_server_grace(handler) -> None:
    """The drain window is spent: let uvicorn wait at most one more second for the calls still running."""
    server = getattr(handler, "__self__", None)
    config = getattr(server, "config", None)
    if config is not None and hasattr(config, "timeout_graceful_shutdown"):
        config.timeout_graceful_shutdown = 1
