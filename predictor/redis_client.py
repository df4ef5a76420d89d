"""One way to open Redis for the job store and the result cache."""

import redis.asyncio as redis


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for `url` (`redis://[:password@]host:port/db`); connections open lazily, on the serving
    event loop, and every command gives up after `timeout_s`."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)
