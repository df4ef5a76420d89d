"""The server a user could write in an afternoon instead, on the same engine: Starlette, one ONNX Runtime
call per request (no batching, no gates), the predictor's own decoding and answer (bench/peers/common.py).

    python bench/peers/plain_onnx_server.py --port 8091
"""

import argparse
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.common import answers, decode_image, engine  # noqa: E402

onnx = engine(max_batch_size=1)


def answer(data: bytes) -> dict:
    return answers(onnx.logits(decode_image(data)[None]))[0]


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
