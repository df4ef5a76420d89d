"""The HTTP guard in front of every route: the HTTP side of admission, body limits and decoding, metrics.

A pure-ASGI middleware, so it sees each request before FastAPI parses anything. Every prediction
call, whatever its protocol (multipart, v1, v2 JSON, v2 binary), passes predictor.serving.admission's
gates first (drain 503 -> key 401 -> rate 429 -> in-flight 503), then: refuse a declared oversized body
(413) -> count it in flight and run it under the request deadline (504), its body read (and, streamed,
cut off at the limit: 413; gzip/deflate decoded under the same limit) inside that deadline -> record
api_* metrics. Admitted calls carry `request.state.caller` (the identity the rate limit counted) and
`request.state.api_key_id` (a digest of the presented key; None without keys), so routes can tie what
they create to its owner. Reading or cancelling a job passes the same gates, with a rate limit of its
own (polling must not eat the caller's prediction budget, nor escape one). It also makes up for what
Starlette and KServe do not: HEAD as GET, a 405's full Allow, versioned v2 paths, no repository API.

The gates themselves run first in `FrontDoor`, which the HTTP protocol calls as soon as a request's
head is parsed (predictor.serving.kserve_compat.use_front_door): a refusal is answered there, before
any ASGI task, framework or routing, so far above saturation refusing costs far less than serving;
an admitted call carries its admission on to the guard, which does not run the gates again.
"""

import asyncio
import re
import time
import zlib

from starlette.requests import Request
from starlette.routing import Match, Route

from predictor.core import metrics
from predictor.core.errors import (
    ApiError,
    DeadlineExceeded,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from predictor.payloads import v2_binary_framing_error
from predictor.serving.admission import Gates
from predictor.serving.http_errors import OIP_ERRORS, BodyRefused, error_parts, error_response, handled

# Calls that need a key (when keys are configured), are rate-limited and count in api_*, with the
# endpoint label they are counted under: the seed's names (a fixed set, so paths cannot explode it).
_PREDICTION_PATHS = (
    (re.compile(r"^/classify/image$"), "classify_image"),
    (re.compile(r"^/classify/batch$"), "classify_batch"),
    (re.compile(r"^/classify/jobs$"), "classify_jobs"),
    (re.compile(r"^/v1/models/[^/]+:predict$"), "v1_predict"),
    (re.compile(r"^/v1/models/[^/]+:explain$"), "explain"),
    (re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$"), "v2_infer"),
)


# A job's status and results page, or its cancellation: guarded like a call, with the read budget.
_JOB_PATH = re.compile(r"^/classify/jobs/[^/]+$")
JOB_READ_ENDPOINT = "job_status"

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# Readiness answers 503 while draining, so Kubernetes stops routing here.
_READINESS_PATH = re.compile(r"^/health$|^/v2/health/ready$|^/v2/models/[^/]+(?:/versions/[^/]+)?/ready$|^/v1/models/[^/:]+$")


def prediction_endpoint(method: str, path: str) -> str | None:
    """The endpoint label of a guarded call (a prediction, or a job's status or cancellation), or
    None for every other request."""
    if method in ("GET", "DELETE") and _JOB_PATH.match(path):
        return JOB_READ_ENDPOINT
    if method != "POST":
        return None
    for pattern, label in _PREDICTION_PATHS:
        if pattern.match(path):
            return label
    return None


# Where the front door leaves an admitted call's rate-limit headers for the guard (in the ASGI scope's state).
ADMITTED_AT_DOOR = "predictor.admitted"


class FrontDoor:
    """The gates of a guarded call, decided from its head alone by the HTTP protocol (no ASGI task yet):
    (status, headers, body) of the refusal, recorded in api_*, or None to let the call go on."""

    def __init__(self, gates: Gates):
        self.gates = gates

    def __call__(self, scope: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        endpoint = prediction_endpoint(scope["method"], scope["path"])
        if endpoint is None:
            return None
        started = time.perf_counter()
        extra_headers: list[tuple[bytes, bytes]] = []
        refused = self.gates.refusal(scope, extra_headers, job_read=endpoint == JOB_READ_ENDPOINT)
        if refused is None:
            self.gates.drain.reserve()  # released by the guard, which this call reaches next
            scope.setdefault("state", {})[ADMITTED_AT_DOOR] = extra_headers
            return None
        status, headers, body = error_parts(refused, oip=scope["path"].startswith("/v2/"))
        if endpoint != JOB_READ_ENDPOINT:
            metrics.record_call(endpoint, status, time.perf_counter() - started)
        return status, [*headers, *extra_headers], body


class RequestGuard:
    """Pure-ASGI middleware applying the checks above to the prediction routes.

    `gates` holds the settings, the drain (the in-flight count this guard keeps) and the limiter.
    """

    def __init__(self, asgi_app, gates: Gates, version: str | None = None, router=None,
                 direct_routes: list[Route] = ()):
        self.app = asgi_app
        self.gates = gates
        self.router = router  # the app's routes (KServe's included once the server starts): for 405s' Allow
        # The one model version served (metadata's `versions`): its /versions/<version>/... paths are the
        # unversioned ones, which KServe (no versioning) serves; any other version stays a 404.
        self.versioned = re.compile(rf"^(/v2/models/[^/]+)/versions/{re.escape(version)}(/infer|/ready)?$") if version else None
        self.settings = gates.settings
        self.drain = gates.drain
        self.limiter = gates.limiter
        # Plain endpoints (the hot routes) the guard calls itself, with the app's error handlers: what
        # lies between it and them otherwise (the framework's exception and telemetry middleware, its exit
        # stack and body limit, and two routers matching the path again) does nothing for them. Only when
        # nothing but the framework's own layers lies there (another user middleware would be skipped).
        framework_only = type(asgi_app).__module__.split(".")[0] in ("starlette", "fastapi")
        self.direct = [(route.path_regex, route.methods, route.endpoint) for route in direct_routes] if framework_only else []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        OIP_ERRORS.set(scope["path"].startswith("/v2/"))
        if self.versioned is not None and (served := self.versioned.match(scope["path"])):
            path = served.group(1) + (served.group(2) or "")
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if scope["method"] != "POST" and prediction_endpoint("POST", scope["path"]) in ("v1_predict", "explain"):
            # Otherwise `GET /v1/models/x:predict` reaches the model-readiness route as model "x:predict".
            return await error_response(MethodNotAllowed(scope["method"], "POST"))(scope, receive, send)
        if scope["method"] == "HEAD":
            # RFC 9110: HEAD wherever GET works, with GET's headers and no body.
            return await self.app({**scope, "method": "GET"}, receive, _without_body(send))
        send = self._allow_every_method(scope, send)
        settings = self.settings
        if self.drain.draining and _READINESS_PATH.match(scope["path"]):
            return await error_response(Unavailable("shutting_down", "This replica is shutting down."))(
                scope, receive, send)
        if scope["path"].startswith("/v2/repository/"):
            # KServe's multi-model repository API (load/unload): unauthenticated, and an unload takes
            # this single-model server out of service. Not served.
            return await error_response(NotFound("not_found", "The model repository API is not served by this predictor."))(
                scope, receive, send)
        endpoint = prediction_endpoint(scope["method"], scope["path"])
        if endpoint == "v2_infer":
            _json_unless_binary(scope)
        if endpoint is None:
            return await self._other(scope, receive, send, settings.max_body_bytes)
        started = time.perf_counter()
        status = {"code": 500, "started": False}
        extra_headers: list[tuple[bytes, bytes]] = []
        # An async job carries up to thousands of images in one body: it has a limit of its own.
        body_limit = settings.max_job_bytes if endpoint == "classify_jobs" else settings.max_body_bytes

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                if extra_headers:
                    message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
            await send(message)

        try:
            admitted = scope.get("state", {}).pop(ADMITTED_AT_DOOR, None)
            if admitted is not None:  # the front door ran the gates on this call already
                extra_headers.extend(admitted)
                refused = None
            else:
                refused = self.gates.refusal(scope, extra_headers, job_read=endpoint == JOB_READ_ENDPOINT)
            refusal = error_response(refused) if refused is not None else None
            if refusal is None:
                refusal = self._declared_too_large(scope, body_limit)
            if refusal is not None:
                if admitted is not None:
                    self.drain.release()
                await refusal(scope, receive, send_and_record)
            else:
                await self._admitted(scope, receive, send_and_record, status, settings, body_limit,
                                     reserved=admitted is not None)
        finally:
            if endpoint != JOB_READ_ENDPOINT:  # api_* (and the error-ratio alert on them) are prediction calls
                metrics.record_call(endpoint, status["code"], time.perf_counter() - started)

    async def _other(self, scope, receive, send, limit: int) -> None:
        """Any other route (probes, metadata, metrics, docs): only the body limit applies."""
        refusal = self._declared_too_large(scope, limit) if scope["method"] in ("POST", "PUT", "PATCH") else None
        if refusal is not None:
            return await refusal(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counting(receive, limit), send_tracked)
        except (ApiError, BodyRefused) as exc:  # the streamed body passed the limit outside FastAPI's handling
            if started:
                raise
            await error_response(exc if isinstance(exc, ApiError) else exc.error)(scope, receive, send)

    async def _admitted(self, scope, receive, send, status: dict, settings, body_limit: int,
                        reserved: bool = False) -> None:
        """Run an admitted prediction call, counted in flight, under its deadline: its body (streamed
        in, cut off at the size limit; a v2 binary body read whole and its framing checked first) and
        the route. 504 once the deadline passes; the error of a refused body as JSON, never a 500."""
        timeout_s = settings.request_timeout_s
        with self.drain.admitted(reserved):
            try:
                async with asyncio.timeout(timeout_s):
                    receive = self._counting(receive, body_limit)
                    encoding = dict(scope["headers"]).get(b"content-encoding", b"identity").strip().lower()
                    if encoding != b"identity":
                        receive = await self._decoded(scope, encoding, receive, body_limit)
                    header_length = dict(scope["headers"]).get(b"inference-header-content-length")
                    if header_length is not None:
                        receive = await self._screen_v2_binary(header_length, receive)
                    await self._route(scope, receive, send)
            except TimeoutError:
                if status["started"]:
                    raise
                await error_response(DeadlineExceeded(timeout_s))(scope, receive, send)
            except (ApiError, BodyRefused) as exc:
                if status["started"]:
                    raise
                await error_response(exc if isinstance(exc, ApiError) else exc.error)(scope, receive, send)

    async def _route(self, scope, receive, send) -> None:
        """An admitted call to its endpoint: a direct one when its path is one of them, else the app."""
        for pattern, methods, endpoint in self.direct:
            if scope["method"] in methods and (match := pattern.match(scope["path"])):
                scope["path_params"] = match.groupdict()
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:  # noqa: BLE001: answered as the app's handlers answer it
                    response = await handled(request, exc)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _allow_every_method(self, scope, send):
        """A 405's Allow lists every method the path has: Starlette names only the first route whose path
        matches (`OPTIONS /classify/jobs/{id}` said `Allow: GET` while DELETE is served too)."""
        async def send_with_allow(message):
            if message["type"] == "http.response.start" and message["status"] == 405 and self.router is not None:
                # Asked of each route (an included router answers for its own) per method, as routing would.
                methods = {method for method in _METHODS
                           if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in self.router.routes)}
                if methods:
                    allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
                    message = {**message, "headers": [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                               + [(b"allow", allow.encode())]}
            await send(message)

        return send_with_allow

    @staticmethod
    async def _decoded(scope, encoding: bytes, receive, limit: int):
        """The body of a gzip- or deflate-encoded call (tritonclient's request compression), decoded as it
        arrives, with the size limit applied to the decoded bytes too (a small bomb is a 413 like a large
        body); the app then sees a plain body. Any other coding: 415, rather than bytes it cannot read."""
        if encoding not in (b"gzip", b"x-gzip", b"deflate"):
            raise UnsupportedMediaType("unsupported_media_type",
                           f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; send gzip, deflate or none.")
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding != b"deflate" else zlib.MAX_WBITS)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise InvalidRequest("invalid_request", "The request body ended before it was complete.")
            try:
                chunk = decoder.decompress(message.get("body", b""), limit + 1 - size)
            except zlib.error:
                raise InvalidRequest("invalid_request", f"The request body is not valid {encoding.decode()} data.") from None
            size += len(chunk)
            if size > limit or decoder.unconsumed_tail:
                raise PayloadTooLarge("payload_too_large", f"The decoded request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
            more = message.get("more_body", False)
        if not decoder.eof:
            raise InvalidRequest("invalid_request", f"The {encoding.decode()} request body is truncated.")
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        return _replay(b"".join(chunks))

    @staticmethod
    def _declared_too_large(scope, limit: int):
        """413 for a Content-Length over the limit, before anything is read; else None."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error_response(PayloadTooLarge(
                "payload_too_large", f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes."))
        return None

    @staticmethod
    def _counting(receive, limit: int):
        """A receive that stops a body (e.g. chunked, without Content-Length) once it passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside FastAPI's body parsing, which passes on only HTTPExceptions
                    raise BodyRefused(PayloadTooLarge("payload_too_large", f"Request body exceeds the limit of {limit} bytes."))
            return message

        return counted

    @staticmethod
    async def _screen_v2_binary(header_length: bytes, receive):
        """Read the (size-limited) body of a v2 binary-data call and check its framing before KServe parses it.

        Inconsistent framing is refused here (ApiError, 400), before any parser sees the body. Returns a
        receive replaying the body for the app. Runs inside the call's deadline and in-flight count, like
        every other body read.
        """
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise InvalidRequest("invalid_request", "The request body ended before it was complete.")
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = v2_binary_framing_error(header_length, body)
        if problem is not None:
            raise problem
        return _replay(body)


def _without_body(send):
    async def headers_only(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only


def _replay(body: bytes):
    """A receive that hands the app `body`, already read, as one message."""
    async def replay():
        nonlocal body
        message, body = {"type": "http.request", "body": body, "more_body": False}, b""
        return message

    return replay


def _json_unless_binary(scope) -> None:
    """The OIP binary-data extension: without Inference-Header-Content-Length the whole body is JSON. Such a
    body with no Content-Type (tritonclient sends none) or application/octet-stream is given application/json,
    so KServe parses it as JSON rather than refusing it as binary data without its header."""
    headers = dict(scope["headers"])
    if b"inference-header-content-length" in headers:
        return
    if headers.get(b"content-type", b"").split(b";")[0].strip().lower() in (b"", b"application/octet-stream"):
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
