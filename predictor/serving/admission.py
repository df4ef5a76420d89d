"""Admission: the gates every prediction call passes, whatever carries it (the HTTP guard,
predictor.serving.guard; the gRPC interceptor, predictor.serving.grpc_server; job reads), in this order:
refuse while draining -> authenticate -> rate-limit -> shed when the replica is saturated. One
implementation, one set of rate-limit buckets and one in-flight count per process. Decided from the
call's headers (or gRPC metadata) and peer alone, before any body is read.
"""

from predictor.config import Settings
from predictor.core import metrics
from predictor.core.drain import Drain
from predictor.core.errors import ApiError, Overloaded, RateLimited, Unauthorized, Unavailable
from predictor.core.security import RateLimiter, caller_identity, presented_key


class Gates:
    """The admission gates of a prediction call.

    `limiter` is None when the rate limit is off; `drain` is the process's shutdown state and
    in-flight count, which the callers of `refusal` keep.
    """

    def __init__(self, settings: Settings, drain: Drain, limiter: RateLimiter | None,
                 read_limiter: RateLimiter | None = None):
        self.settings = settings
        self.drain = drain
        self.limiter = limiter
        self.read_limiter = read_limiter  # job reads (JOB_READ_ENDPOINT)

    @classmethod
    def build(cls, settings: Settings, drain: Drain) -> "Gates":
        def limiter(per_minute: int) -> RateLimiter | None:
            return RateLimiter(per_minute) if per_minute > 0 else None

        return cls(settings, drain, limiter(settings.rate_limit_per_minute), limiter(settings.job_reads_per_minute))

    def refusal(self, scope: dict, extra_headers: list, job_read: bool = False) -> ApiError | None:
        """The error of a call that must not proceed (draining, no key, over its rate, replica saturated), else
        None. `scope` needs `headers` (lower-case byte pairs) and `client`; the admitted caller is recorded
        in its `state`; the rate-limit headers of an admitted call are appended to `extra_headers`. A job
        read (`job_read`) spends the read budget instead of the prediction one."""
        settings = self.settings
        limiter = self.read_limiter if job_read else self.limiter
        if self.drain.draining:
            return Unavailable("shutting_down", "This replica is shutting down; retry on another.",
                            {"Retry-After": "1", "Connection": "close"})
        headers = dict(scope["headers"])
        key = presented_key(headers)
        if settings.api_keys.enabled and not settings.api_keys.accepts(key):
            message = "A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            return Unauthorized("unauthorized", message if key is None else "The API key is not valid.",
                            {"WWW-Authenticate": "Bearer"})
        key_id = settings.api_keys.key_id(key) if settings.api_keys.enabled else None
        identity = caller_identity(scope, key_id, settings.trusted_proxy_hops)
        scope.setdefault("state", {}).update(caller=identity, api_key_id=key_id)
        if limiter is not None:
            decision = limiter.check(identity)
            extra_headers.extend((k.lower().encode(), v.encode()) for k, v in decision.headers().items()
                                 if k != "Retry-After")
            if not decision.allowed:
                return RateLimited("rate_limited",
                                f"More than {decision.limit} requests per minute; retry in {decision.retry_after_s} s.",
                                {"Retry-After": str(decision.retry_after_s)})
        if self.drain.in_flight >= settings.max_in_flight:
            # Refused before the body is read or FastAPI runs: far above saturation a refusal must
            # cost much less than a served call, or the refusals themselves swamp the event loop.
            metrics.SHED.inc()
            return Overloaded(f"{self.drain.in_flight} calls are already in flight (limit {settings.max_in_flight})")
        return None
