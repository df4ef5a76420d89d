"""gRPC (Open Inference Protocol v2, `--enable_grpc true`) on real server processes, with a real gRPC client:
the repository API refused, the same gates as HTTP, errors as gRPC status codes, metadata and inference."""

import grpc
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from .conftest import MODEL_NAME, Server, free_port


def start(*args: str, env: dict | None = None) -> Server:
    grpc_port = free_port()
    srv = Server("--enable_grpc", "true", "--grpc_port", str(grpc_port), *args, env=env)
    srv.grpc_port = grpc_port
    srv.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    srv.stub = GRPCInferenceServiceStub(srv.channel)
    return srv


def stop(srv: Server) -> None:
    srv.channel.close()
    srv.stop()


@pytest.fixture(scope="module")
def grpc_server():
    srv = start("--rate_limit_per_minute", "0")
    yield srv
    stop(srv)


def image_request(jpeg: bytes) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[jpeg]))])


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


# -- the repository API ----------------------------------------------------------------------------
@pytest.mark.parametrize("rpc, request_type", [("RepositoryModelUnload", pb.RepositoryModelUnloadRequest),
                                               ("RepositoryModelLoad", pb.RepositoryModelLoadRequest)])
def test_a_keyless_repository_call_is_refused_and_the_model_keeps_serving(grpc_server, cifar_jpegs, rpc, request_type):
    error = grpc_error(getattr(grpc_server.stub, rpc), request_type(model_name=MODEL_NAME), timeout=30)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "The model repository API is not served by this predictor."
    assert grpc_server.client.get("/health").status_code == 200
    assert grpc_server.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=30).ready
    reply = grpc_server.stub.ModelInfer(image_request(cifar_jpegs["ship_0000.jpg"]), timeout=30)
    assert [o.name for o in reply.outputs] == ["probabilities", "label"]
    assert grpc_server.client.post("/classify/image", files={"file": cifar_jpegs["ship_0000.jpg"]}).status_code == 200
