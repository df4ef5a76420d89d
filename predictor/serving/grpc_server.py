"""The gRPC side (Open Inference Protocol v2 over gRPC, `--enable_grpc`): KServe's servicer behind our gates.

KServe's gRPC server also serves the multi-model repository API (`RepositoryModelLoad/Unload`),
unauthenticated: one unload takes this single-model server out of service. Over HTTP that API is a
404 (predictor.serving.guard); here it answers UNIMPLEMENTED, as a server without the repository extension does.

Every `ModelInfer` passes the HTTP calls' gates (predictor.serving.admission.Gates: the same code, the same
rate-limit buckets and in-flight count), in the same order: refused while draining (UNAVAILABLE) ->
API key from `authorization: Bearer` or `x-api-key` metadata (UNAUTHENTICATED) -> rate limit
(RESOURCE_EXHAUSTED) -> in-flight limit (UNAVAILABLE) -> counted in flight and run under the smaller
of the caller's gRPC deadline and --request_timeout_s (DEADLINE_EXCEEDED) -> counted in
api_requests_total{endpoint="v2_infer"} with the HTTP status its outcome corresponds to. Messages over
--max_body_bytes are refused by the transport (RESOURCE_EXHAUSTED) before anything is parsed.
Errors are the HTTP API's, as gRPC status codes; a bad request is never INTERNAL.
`predictor.serving.kserve_compat.use_grpc_server` makes KServe's ModelServer build this server instead of its own.
"""

import asyncio
import logging
import time
from concurrent import futures

import grpc
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc import server as kserve_grpc
from kserve.protocol.grpc.servicer import InferenceServicer

from predictor.core import metrics
from predictor.core.errors import (
    ApiError,
    Conflict,
    DeadlineExceeded,
    InferenceFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unimplemented,
    UnprocessableRequest,
    UnsupportedMediaType,
)
from predictor.payloads import SERVER_EXTENSIONS
from predictor.serving.admission import Gates
from predictor.serving.http_errors import as_api_error, http_status

log = logging.getLogger("predictor")

REPOSITORY_REFUSED = "The model repository API is not served by this predictor."
_INFER = "/inference.GRPCInferenceService/ModelInfer"
# Each domain kind's gRPC code (a subclass answers as its kind).
_GRPC_CODES: dict[type[ApiError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT, UnprocessableRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT, MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED, NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION, PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED, InternalError: grpc.StatusCode.INTERNAL,
    InferenceFailed: grpc.StatusCode.INTERNAL, Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE, DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# HTTP/2 forbids connection-specific headers in metadata.
_NOT_METADATA = {"connection"}


def status_code(error: ApiError) -> grpc.StatusCode:
    """The gRPC code of a domain error's kind."""
    return next((_GRPC_CODES[kind] for kind in type(error).__mro__ if kind in _GRPC_CODES), grpc.StatusCode.INTERNAL)


def _metadata(headers: dict | None, extra: list[tuple[bytes, bytes]] = ()) -> tuple[tuple[str, str], ...]:
    pairs = [(k.decode(), v.decode()) for k, v in extra]
    pairs += [(k.lower(), str(v)) for k, v in (headers or {}).items() if k.lower() not in _NOT_METADATA]
    return tuple(pairs)


def _peer_host(peer: str) -> str:
    """The address of `context.peer()` ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer or "unknown"


class GateInterceptor(aio.ServerInterceptor):
    """Maps every handler's errors to gRPC codes, and puts ModelInfer behind `gates`."""

    def __init__(self, gates: Gates):
        self.gates = gates

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        admit = handler_call_details.method == _INFER

        async def guarded(request, context: aio.ServicerContext):
            """`request`: the message, or for ModelInfer the stream it is still to be read from."""
            started, status, error, extra = time.perf_counter(), 500, None, []
            try:
                response = await (self._admitted(behavior, request, context, extra) if admit
                                  else behavior(request, context))
                status = 200
                return response
            except asyncio.CancelledError:
                # The caller cancelled or its own deadline passed: gRPC has already ended the call.
                remaining = context.time_remaining()
                status = 504 if remaining is not None and remaining < 0.05 else 499
                raise
            except Exception as exc:  # noqa: BLE001: every failure becomes a status code, never a stack trace
                error = as_api_error(exc, "gRPC")
                status = http_status(error)
            finally:
                if admit:
                    metrics.record_call("v2_infer", status, time.perf_counter() - started)
            await context.abort(status_code(error), error.message,
                                trailing_metadata=_metadata(error.headers, extra))

        # ModelInfer is served as a client-streaming method (the same bytes on the wire), so that the gates
        # run on its metadata before its message, up to --max_body_bytes, is received and parsed: a
        # unary handler is only called once the whole message is in memory.
        make = grpc.stream_unary_rpc_method_handler if admit else grpc.unary_unary_rpc_method_handler
        return make(guarded, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    async def _admitted(self, behavior, requests, context: aio.ServicerContext, extra: list):
        """The gates (on the call's metadata and peer alone), then the call counted in flight under the
        smaller of both deadlines, its message read from `requests` within it; the rate-limit headers
        (sent as trailing metadata) are appended to `extra`."""
        gates = self.gates
        scope = {"headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in context.invocation_metadata() or ()
                             if not k.endswith("-bin")],
                 "client": (_peer_host(context.peer()), 0)}
        refused = gates.refusal(scope, extra)
        if refused is not None:
            raise refused
        remaining = context.time_remaining()
        timeout_s = gates.settings.request_timeout_s if remaining is None else min(remaining, gates.settings.request_timeout_s)
        with gates.drain.admitted():
            try:
                async with asyncio.timeout(timeout_s):
                    request = await anext(aiter(requests), None)
                    if request is None:
                        raise InvalidRequest("invalid_request", "The call carried no ModelInferRequest message.")
                    response = await behavior(request, context)
            except TimeoutError:
                raise DeadlineExceeded(timeout_s) from None
        context.set_trailing_metadata(_metadata(None, extra))
        return response


class GuardedServicer(InferenceServicer):
    """KServe's inference servicer without the repository API, not ready while draining."""

    def __init__(self, data_plane, model_repository_extension, gates: Gates):
        super().__init__(data_plane, model_repository_extension)
        self.gates = gates

    def _served(self, name: str, version: str):
        """The model `name`, when `version` is empty or the one version served (the weights': ModelMetadata's
        `versions`); no other exists."""
        model = self._data_plane.get_model_from_registry(name)
        if version and version != model.version:
            raise NotFound("not_supported", f"Model {model.name} has no version {version!r}; "
                                            f"it serves version {model.version!r} only.")
        return model

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context):
        raise Unimplemented("not_supported", REPOSITORY_REFUSED)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context):
        raise Unimplemented("not_supported", REPOSITORY_REFUSED)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        """The proto's fields only (KServe's would pass the REST metadata's `parameters`, which the proto lacks)."""
        model = self._served(request.name, request.version)

        def tensors(types: list[dict]) -> list:
            return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in types]

        return pb.ModelMetadataResponse(name=model.name, versions=[model.version], platform=model.platform,
                                        inputs=tensors(model.get_input_types()), outputs=tensors(model.get_output_types()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context):
        metadata = self._data_plane.metadata()
        return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"], extensions=SERVER_EXTENSIONS)

    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        if request.model_version:
            self._served(request.model_name, request.model_version)
        return await super().ModelInfer(request, context)

    async def ServerReady(self, request, context):
        if self.gates.drain.draining:
            return pb.ServerReadyResponse(ready=False)
        return await super().ServerReady(request, context)

    async def ModelReady(self, request, context):
        if self.gates.drain.draining:
            return pb.ModelReadyResponse(ready=False)
        return await super().ModelReady(request, context)


class GuardedGRPCServer(kserve_grpc.GRPCServer):
    """KServe's GRPCServer serving GuardedServicer behind GateInterceptor (same port and graceful stop)."""

    async def start(self, max_workers):
        gates = self._gates()
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(GateInterceptor(gates),),
            # One message is one call's body: --max_body_bytes bounds it as it bounds an HTTP body.
            # No BDP probing: it grows each stream's flow-control window to megabytes, which the peer
            # fills before the gates have run, so a burst of calls to be refused was held in memory
            # (40 x 10 MB unauthenticated calls: +38..150 MB RSS with it, < 1 MB without). Each stream
            # keeps gRPC's fixed 64 KiB read-ahead; on loopback a 10 MB call took no longer.
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", gates.settings.max_body_bytes),
                     ("grpc.http2.bdp_probe", 0)],
        )
        servicer = GuardedServicer(self._data_plane, self._model_repository_extension, gates)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        log.info("gRPC (Open Inference Protocol v2) on port %d, behind the HTTP API's gates; model repository API refused",
                 self._port)
        await self._server.start()
        await self._server.wait_for_termination()

    def _gates(self) -> Gates:
        """The gates the HTTP side of this process uses (predictor.app.install); with --workers N the
        HTTP side lives in the worker processes, and this process's gRPC calls get gates of their own."""
        (model,) = self._data_plane.model_registry.get_models().values()
        return getattr(model, "gates", None) or Gates.build(model.settings, model.drain)
