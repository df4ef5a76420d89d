"""Ray Serve 2.60 with `@serve.batch`, serving the predictor's engine, decoding and answer at
POST /classify/image (and GET /health), one replica on a local Ray of the machine's cores.

    python bench/peers/ray_serve_app.py --port 8095      # in Ray's own environment (make bench-peers)

One deployment: the replica decodes each upload and awaits a `@serve.batch` method holding the
engine (at most 32 images a batch and 2 ms of waiting for company, the predictor's defaults);
`max_ongoing_requests` is raised from its default of 5, which would cap every batch at 5.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers.common import answers, decode_image, engine  # noqa: E402

MAX_BATCH_SIZE = 32


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class Cifar10:
    def __init__(self) -> None:
        self.engine = engine(MAX_BATCH_SIZE)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.002)
    async def logits(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.engine.logits(np.stack(images)))

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path == "/health":
            return JSONResponse({"status": "healthy"})
        upload = (await request.form()).get("file")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": {"code": "invalid_request", "message": "no file"}}, status_code=422)
        image = decode_image(await upload.read())
        return JSONResponse(answers((await self.logits(image))[None])[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8095)
    port = parser.parse_args().port
    # On SIGTERM exit through atexit, where ray.shutdown() stops the local cluster this process started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Cifar10.bind(), route_prefix="/")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
