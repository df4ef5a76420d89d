"""One way to open Redis for the job store and the result cache."""

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError


def connect(url: str, timeout_s: float, retries: int) -> redis.Redis:
    """A client for `url` (`redis://[:password@]host:port/db`); connections open lazily, on the serving
    event loop, and every command gives up after `timeout_s`. A command that finds its pooled connection
    dead (Redis restarted since) is retried up to `retries` times on a new one."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries, supported_errors=(ConnectionError,))
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30, retry=retry)
