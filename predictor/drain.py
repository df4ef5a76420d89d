"""Shutdown and in-flight state shared by the HTTP guard (which admits calls) and the batcher."""

import logging
import signal

log = logging.getLogger("predictor")


class Drain:
    """Shutdown state: once draining, readiness and new prediction calls get 503 while admitted ones finish.

    The model itself stays ready: admitted calls (v1/v2 included, which KServe checks against the
    model's readiness) must complete. Liveness stays 200 so the kubelet does not kill the drain.
    """

    draining = False
    in_flight = 0

    @classmethod
    def calls_in_flight(cls) -> int:
        return cls.in_flight

    @classmethod
    def begin(cls) -> None:
        if cls.draining:
            return
        cls.draining = True
        log.info("SIGTERM: draining; readiness is now 503, %d admitted request(s) in flight", cls.in_flight)

    @classmethod
    def chain_signal_handler(cls) -> None:
        """Run `begin` first on SIGTERM, then whatever handler the server installed (uvicorn's graceful exit)."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            cls.begin()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
