"""MLServer 1.7 with adaptive batching, serving the predictor's engine, decoding and answer at
POST /classify/image (a custom handler, so the benchmark's multipart uploads reach it unchanged).

    python bench/peers/mlserver_runtime.py --port 8093     # in MLServer's own environment (make bench-peers)

Its v2 infer (JSON, and gRPC on port + 1000) takes the `image` input as BYTES (the files: base64 in JSON,
as the predictor's v2 JSON) or a UINT8 [N, 32, 32, 3] tensor.
The handler decodes the upload and calls `self.predict` with a one-image UINT8 tensor; MLServer's
adaptive batching has replaced `predict` by then, so concurrent calls share a forward pass
(max_batch_size and max_batch_time as the predictor's defaults: 32 images, 2 ms). One process
(`parallel_workers: 0`): with inference workers, every call would also cross a process boundary.
"""

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from mlserver import MLModel  # noqa: E402
from mlserver.codecs import NumpyCodec  # noqa: E402
from mlserver.context import model_context  # noqa: E402
from mlserver.handlers import custom_handler  # noqa: E402
from mlserver.types import InferenceRequest, InferenceResponse  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402

from bench.peers.common import answers, decode_image, engine  # noqa: E402
from predictor.core.imaging import JPEG_MAGIC, PNG_MAGIC  # noqa: E402

MAX_BATCH_SIZE = 32
MAX_BATCH_TIME_S = 0.002


def _file(item) -> bytes:
    """A BYTES element as MLServer hands it over: base64 text from JSON, the file itself from gRPC."""
    data = item.encode() if isinstance(item, str) else bytes(item)
    return data if data.startswith((JPEG_MAGIC, PNG_MAGIC)) else base64.b64decode(data)


class Cifar10Runtime(MLModel):
    async def load(self) -> bool:
        self._engine = engine(MAX_BATCH_SIZE)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = payload.inputs[0]
        if tensor.datatype == "BYTES":  # the files: base64 strings over JSON, the bytes themselves over gRPC
            images = np.stack([decode_image(_file(item)) for item in tensor.data.root])
        else:
            images = NumpyCodec.decode_input(tensor)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", self._engine.logits(images))])

    @custom_handler(rest_path="/classify/image", rest_method="POST")
    async def classify_image(self, request: Request) -> JSONResponse:
        upload = (await request.form()).get("file")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": {"code": "invalid_request", "message": "no file"}}, status_code=422)
        image = decode_image(await upload.read())[None]
        with model_context(self.settings):  # as MLServer's own /infer handler calls predict
            response = await self.predict(InferenceRequest(inputs=[NumpyCodec.encode_input("images", image)]))
        return JSONResponse(answers(NumpyCodec.decode_output(response.outputs[0]))[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8093)
    port = parser.parse_args().port
    repository = Path(tempfile.mkdtemp(prefix="mlserver-peer-"))
    (repository / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": port, "grpc_port": port + 1000,
        "metrics_port": port + 2000, "metrics_dir": str(repository / "metrics")}))
    model = repository / "cifar10"
    model.mkdir()
    (model / "model-settings.json").write_text(json.dumps({
        "name": "cifar10", "implementation": "bench.peers.mlserver_runtime.Cifar10Runtime",
        "max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MAX_BATCH_TIME_S}))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execv(mlserver, [str(mlserver), "start", str(repository)])


if __name__ == "__main__":
    main()
