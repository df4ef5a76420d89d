"""The server a user could write in an afternoon instead, on the same engine: Starlette, one ONNX Runtime
call per request (no batching, no gates), the predictor's own decoding and answer.

    python bench/plain_onnx_server.py --port 8091

The same shipped int8 graph and ONNX Runtime settings as the predictor's default engine
(predictor.engines.onnx_int8.OnnxEngine: sequential, no spinning, the usable cores as intra-op threads), so
that `make bench` shows what the predictor's serving stack costs or gains over none.
"""

import argparse
from datetime import datetime, timezone

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from predictor.cifar import CLASSES
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path
from predictor.engines.selection import usable_cores
from predictor.serving.imaging import decode_image
from predictor.weights import PACKAGED_DIR, read_card

card = read_card(PACKAGED_DIR)
engine = OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), max_batch_size=1, threads=usable_cores())
temperature = float(card.get("temperature", 1.0))


def answer(data: bytes) -> dict:
    logits = engine.logits(decode_image(data)[None])[0].astype(np.float64) / temperature
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    best = int(probabilities.argmax())
    return {"predicted_class": CLASSES[best], "confidence": round(float(probabilities[best]), 6),
            "all_probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probabilities)},
            "timestamp": datetime.now(timezone.utc).isoformat()}


async def classify(request: Request) -> JSONResponse:
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return JSONResponse({"error": {"code": "invalid_request", "message": "no file"}}, status_code=422)
    return JSONResponse(await run_in_threadpool(answer, await upload.read()))


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "healthy"})


app = Starlette(routes=[Route("/classify/image", classify, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8091)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning")
