"""Who may call the prediction routes, and how often: API keys and per-caller token buckets."""

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


class ApiKeys:
    """The configured keys; `accepts` compares in constant time and never reveals which key matched."""

    def __init__(self, keys: list[str]):
        # Comparing fixed-length digests keeps the time independent of the keys' lengths and contents.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def load(cls, inline: str = "", file: Path | None = None) -> "ApiKeys":
        """Keys from a comma-separated string and/or a file with one key per line ('#' comments allowed)."""
        keys = [k.strip() for k in inline.split(",")]
        if file is not None:
            keys += [line.strip() for line in Path(file).read_text().splitlines() if not line.lstrip().startswith("#")]
        return cls([k for k in keys if k])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: str | None) -> bool:
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(digest, known)
        return matched


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if either is there."""
    api_key = headers.get(b"x-api-key")
    if api_key:
        return api_key.decode("latin-1").strip()
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def caller_identity(scope: dict, headers: dict[bytes, bytes], key: str | None, trust_forwarded_for: bool) -> str:
    """What the rate limit counts against: the API key (as a digest), else the client's address.

    Behind a proxy every connection comes from the proxy, so with `trust_forwarded_for` the address
    is the right-most X-Forwarded-For entry: the one the trusted proxy itself appended.
    """
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    if trust_forwarded_for and headers.get(b"x-forwarded-for"):
        return "addr:" + headers[b"x-forwarded-for"].decode("latin-1").split(",")[-1].strip()
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: int  # whole seconds until one more request is allowed (0 when allowed)
    reset_s: int  # whole seconds until the bucket is full again

    def headers(self) -> dict[str, str]:
        found = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                 "X-RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            found["Retry-After"] = str(self.retry_after_s)
        return found


class RateLimiter:
    """Token buckets per caller: `per_minute` requests at once, refilled at `per_minute` per minute.

    The buckets live in this process, so the limit holds per replica (and per worker process).
    The least recently seen callers are forgotten beyond `max_callers`, bounding memory.
    """

    def __init__(self, per_minute: int, max_callers: int = 100_000, clock=time.monotonic):
        self.capacity = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, updated)

    def check(self, caller: str) -> Decision:
        now = self.clock()
        tokens, updated = self._buckets.pop(caller, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0 - 1e-9  # tolerate float rounding of the refill (0.6 s x 100/60 per s)
        if allowed:
            tokens = max(0.0, tokens - 1.0)
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return Decision(allowed, self.capacity, int(tokens),
                        0 if allowed else math.ceil((1.0 - tokens) / self.rate),
                        math.ceil((self.capacity - tokens) / self.rate))
