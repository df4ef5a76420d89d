"""Who may call the prediction routes, and how often: API keys and per-caller token buckets."""

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


class ApiKeys:
    """The configured keys; `accepts` compares in constant time and never reveals which key matched.

    `key_id` names a key by HMAC-SHA256 under `id_secret` (KEY_ID_SECRET): the name stored with cache
    entries and jobs, in Redis too, where anyone who reads it must not be able to test guesses of a
    key offline, as they could against a plain hash. Every process given the same secret names a key
    alike; without one (`id_secret` None) the secret is drawn at random here, so the names mean
    nothing outside this process (its --workers receive it pickled with the settings).
    """

    ID_SECRET_MIN_LENGTH = 32

    def __init__(self, keys: list[str], id_secret: str | None = None):
        # Comparing fixed-length digests keeps the time independent of the keys' lengths and contents.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.id_secret_shared = bool(id_secret)  # False: a per-process secret
        self._id_secret = id_secret.encode() if id_secret else secrets.token_bytes(32)

    @classmethod
    def load(cls, inline: str = "", file: Path | None = None, id_secret: str | None = None) -> "ApiKeys":
        """Keys from a comma-separated string and/or a file with one key per line ('#' comments allowed)."""
        keys = [k.strip() for k in inline.split(",")]
        if file is not None:
            keys += [line.strip() for line in Path(file).read_text().splitlines() if not line.lstrip().startswith("#")]
        return cls([k for k in keys if k], id_secret)

    def __repr__(self) -> str:  # never the secret, never the digests
        return f"ApiKeys({len(self)} keys)"

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

    def key_id(self, key: str) -> str:
        """A stable, non-secret name for an API key: HMAC-SHA256(id secret, key), 128 bits in hex. Safe to
        store and to log; without the secret it cannot be checked against a guessed key."""
        return hmac.new(self._id_secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if either is there."""
    api_key = headers.get(b"x-api-key")
    if api_key:
        return api_key.decode("latin-1").strip()
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def caller_identity(scope: dict, key_id: str | None, trusted_proxy_hops: int) -> str:
    """What the rate limit counts against: the API key (by its `ApiKeys.key_id`), else the client's address."""
    if key_id is not None:
        return "key:" + key_id
    return "addr:" + client_address(scope, trusted_proxy_hops)


def client_address(scope: dict, trusted_proxy_hops: int) -> str:
    """The caller's address, decided here only (uvicorn's own X-Forwarded-For rewriting is off:
    `kserve_compat.configure_uvicorn`), so the peer in `scope["client"]` is the TCP peer.

    0 trusted hops: the peer; X-Forwarded-For is ignored (anyone can write it). N hops: the N
    proxies in front each appended the address they saw, so the N-th entry from the right is the one
    the outermost trusted proxy wrote, the client it saw; entries further left are the client's own
    words. Every X-Forwarded-For line counts, in order. With fewer than N entries (a trusted hop that
    appends only sometimes, e.g. Knative's activator), the left-most; with none, the peer.
    """
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    if trusted_proxy_hops <= 0:
        return peer
    entries = [entry.strip() for name, value in scope["headers"] if name == b"x-forwarded-for"
               for entry in value.decode("latin-1").split(",") if entry.strip()]
    if not entries:
        return peer
    return entries[-min(trusted_proxy_hops, len(entries))]


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
        return Decision(allowed, self.capacity, max(0, int(tokens)),
                        0 if allowed else math.ceil((1.0 - tokens) / self.rate),
                        math.ceil((self.capacity - tokens) / self.rate))

    def charge(self, caller: str, cost: float) -> None:
        """Take `cost` more tokens from an admitted call (a job's files beyond its first), into debt if need be:
        the caller's next calls wait until the bucket has refilled past it. Never refuses the call itself."""
        now = self.clock()
        tokens, updated = self._buckets.pop(caller, (float(self.capacity), now))
        self._buckets[caller] = (min(float(self.capacity), tokens + (now - updated) * self.rate) - cost, now)
