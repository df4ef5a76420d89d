"""The gRPC side (Open Inference Protocol v2 over gRPC, `--enable_grpc`): KServe's servicer, made safe.

KServe's gRPC server also serves the multi-model repository API (`RepositoryModelLoad/Unload`),
unauthenticated: one unload takes this single-model server out of service. Over HTTP that API is a
404 (predictor.guard); here it answers UNIMPLEMENTED, as a server without the repository extension does.
`use_guarded_grpc` makes KServe's ModelServer build this server instead of its own.
"""

import logging
from concurrent import futures

import grpc
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc import server as kserve_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

log = logging.getLogger("predictor")

REPOSITORY_REFUSED = "The model repository API is not served by this predictor."


class GuardedServicer(InferenceServicer):
    """KServe's inference servicer without the repository API."""

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_REFUSED)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_REFUSED)


class GuardedGRPCServer(kserve_grpc.GRPCServer):
    """KServe's GRPCServer serving GuardedServicer (same options, port and graceful stop)."""

    async def start(self, max_workers):
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(ExceptionToStatusInterceptor(),),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))],
        )
        servicer = GuardedServicer(self._data_plane, self._model_repository_extension)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        log.info("gRPC (Open Inference Protocol v2) on port %d; model repository API refused", self._port)
        await self._server.start()
        await self._server.wait_for_termination()


def use_guarded_grpc() -> None:
    """Make KServe's ModelServer start GuardedGRPCServer for `--enable_grpc true`."""
    from kserve import model_server

    model_server.GRPCServer = GuardedGRPCServer
