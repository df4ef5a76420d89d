"""The seed's design, for comparison: FastAPI, one forward pass per request, same network and weights.

    python bench/baseline_server.py --port 8090
"""

import argparse
import io
from datetime import datetime, timezone

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from predictor.cifar import CLASSES
from predictor.network import normalize
from predictor.weights import PACKAGED_DIR, load_model

app = FastAPI()
model, card = load_model(PACKAGED_DIR)
model = model.to(memory_format=torch.channels_last)
temperature = float(card.get("temperature", 1.0))


@app.post("/classify/image")
def classify(file: UploadFile = File(...)):  # a sync handler: FastAPI runs it in its thread pool
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB").resize((32, 32))
    with torch.inference_mode():
        logits = model(normalize(torch.from_numpy(np.asarray(image)[None])))[0]
    probabilities = (logits / temperature).softmax(0)
    best = int(probabilities.argmax())
    return {"predicted_class": CLASSES[best], "confidence": float(probabilities[best]),
            "all_probabilities": dict(zip(CLASSES, probabilities.tolist())),
            "timestamp": datetime.now(timezone.utc).isoformat()}


@app.get("/health")
def health():
    return {"status": "healthy"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--torch-threads", type=int, default=0, help="intra-op threads per forward; 0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
