"""The gRPC side (Open Inference Protocol v2 over gRPC, `--enable_grpc`): KServe's servicer behind our gates.

KServe's gRPC server also serves the multi-model repository API (`RepositoryModelLoad/Unload`),
unauthenticated: one unload takes this single-model server out of service. Over HTTP that API is a
404 (predictor.serving.guard); here it answers UNIMPLEMENTED, as a server without the repository extension does.

Every `ModelInfer` passes the HTTP guard's gates (predictor.serving.guard.Gates: the same code, the same
rate-limit buckets and in-flight count), in the same order: refused while draining (UNAVAILABLE) ->
API key from `authorization: Bearer` or `x-api-key` metadata (UNAUTHENTICATED) -> rate limit
(RESOURCE_EXHAUSTED) -> in-flight limit (UNAVAILABLE) -> counted in flight and run under the smaller
of the caller's gRPC deadline and --request_timeout_s (DEADLINE_EXCEEDED) -> counted in
api_requests_total{endpoint="v2_infer"} with the HTTP status its outcome corresponds to. Messages over
--max_body_bytes are refused by the transport (RESOURCE_EXHAUSTED) before anything is parsed.
Errors are the HTTP API's, as gRPC status codes; a bad request is never INTERNAL.
`predictor.serving.kserve_compat.use_guarded_grpc` makes KServe's ModelServer build this server instead of its own.
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

from predictor.serving import metrics
from predictor.serving.error_handlers import as_api_error
from predictor.serving.errors import (
    DeadlineExceeded,
    NotFound,
    Unimplemented,
)
from predictor.serving.guard import Gates
from predictor.serving.payloads import SERVER_EXTENSIONS

log = logging.getLogger("predictor")

REPOSITORY_REFUSED = "The model repository API is not served by this predictor."
_INFER = "/inference.GRPCInferenceService/ModelInfer"
_STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                 409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
                 500: grpc.StatusCode.INTERNAL, 501: grpc.StatusCode.UNIMPLEMENTED,
                 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# HTTP/2 forbids connection-specific headers in metadata.
_NOT_METADATA = {"connection"}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (another 4xx: INVALID_ARGUMENT; another 5xx: INTERNAL)."""
    return _STATUS_CODES.get(http_status, grpc.StatusCode.INVALID_ARGUMENT if http_status < 500 else grpc.StatusCode.INTERNAL)


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
                status = error.status
            finally:
                if admit:
                    metrics.REQUESTS.labels("v2_infer", "success" if status < 400 else "error", str(status)).inc()
                    metrics.LATENCY.labels("v2_infer").observe(time.perf_counter() - started)
            await context.abort(status_code(error.status), error.message,
                                trailing_metadata=_metadata(error.headers, extra))

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    async def _admitted(self, behavior, request, context: aio.ServicerContext, extra: list):
        """The gates, then the call counted in flight under the smaller of both deadlines; the
        rate-limit headers (sent as trailing metadata) are appended to `extra`."""
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

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context):
        raise Unimplemented("not_supported", REPOSITORY_REFUSED)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context):
        raise Unimplemented("not_supported", REPOSITORY_REFUSED)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        """The proto's fields only (KServe's would pass the REST metadata's `parameters`, which the proto lacks)."""
        model = self._data_plane.get_model_from_registry(request.name)
        if request.version and request.version != model.version:
            raise NotFound("not_supported", f"Model {model.name} has no version {request.version!r}; "
                                                 f"it serves version {model.version!r} only.")

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
            # The one version served is the weights' (ModelMetadata's `versions`); no other exists.
            model = self._data_plane.get_model_from_registry(request.model_name)
            if request.model_version != model.version:
                raise NotFound("not_supported", f"Model {model.name} has no version {request.model_version!r}; "
                                                     f"it serves version {model.version!r} only.")
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
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", gates.settings.max_body_bytes)],
        )
        servicer = GuardedServicer(self._data_plane, self._model_repository_extension, gates)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        log.info("gRPC (Open Inference Protocol v2) on port %d, behind the HTTP API's gates; model repository API refused",
                 self._port)
        await self._server.start()
        await self._server.wait_for_termination()

    def _gates(self) -> Gates:
        """The gates the HTTP side of this process uses (predictor.serving.app.install); with --workers N the
        HTTP side lives in the worker processes, and this process's gRPC calls get gates of their own."""
        (model,) = self._data_plane.model_registry.get_models().values()
        return getattr(model, "gates", None) or Gates.build(model.settings, model.drain)
