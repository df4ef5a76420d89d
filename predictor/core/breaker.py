"""A circuit breaker for a remote dependency (Redis, for the result cache and the job store): after a
failure, callers skip it for `retry_after_s` instead of each waiting out its own timeout, and it is
tried again after that. One outage is logged once, and its end once. `watch` probes the dependency in
the background, so that an outage opens the breaker before a caller has to wait out a timeout to find it."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("predictor")


class Breaker:
    """`usable()` before a call; `failed(exc)` / `succeeded()` after it. `what` names the user in the log."""

    def __init__(self, what: str, retry_after_s: float, clock=time.monotonic):
        self.what = what
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._down_until: float | None = None  # set while the dependency is considered down

    def usable(self) -> bool:
        return self._down_until is None or self.clock() >= self._down_until

    def failed(self, exc: Exception, consequence: str) -> None:
        """Open (or keep open) the breaker; `consequence` says in the log what callers get meanwhile.
        A failure that is really the calling task's cancellation (redis-py reports a command interrupted
        by it as a connection error) raises CancelledError instead: the dependency is fine."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError()
        if self._down_until is None:  # once per outage
            log.warning("%s: Redis unavailable (%s); %s, retrying every %g s", self.what, exc, consequence,
                        self.retry_after_s)
        self._down_until = self.clock() + self.retry_after_s

    def succeeded(self) -> None:
        if self._down_until is not None:
            log.info("%s: Redis reachable again", self.what)
            self._down_until = None

    async def watch(self, probe: Callable[[], Awaitable[object]], interval_s: float) -> None:
        """Run `probe` (a cheap call with a short timeout: PING) every `interval_s` until cancelled; its
        failure opens the breaker at once, its success closes it."""
        while True:
            try:
                await probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001: whatever the probe met, the dependency is not usable
                self.failed(exc, "calls fail at once")
            else:
                self.succeeded()
            await asyncio.sleep(interval_s)
