"""The seed's HTTP API (and what KServe's own routes lack), built for one classifier.

`build_router(model)` returns the routes; `predictor.app.install` puts them on the app ahead of
KServe's own, so `/health` and `/metrics` here win over KServe's. The multipart routes call the data
plane (predictor.dataplane) directly.
"""

from importlib import metadata as package_metadata

from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from predictor.core import metrics
from predictor.core.errors import ApiError, NotFound, PayloadTooLarge, Unavailable
from predictor.model import Cifar10Classifier
from predictor.payloads import SERVER_EXTENSIONS, timestamp
from predictor.serving.http_errors import error_response

NOT_READY = Unavailable("model_not_ready", "The model is not loaded yet.")


def build_router(model: Cifar10Classifier) -> APIRouter:
    """`/classify/image`, `/classify/batch` (through the result cache: `X-Cache: hit|miss`), `/health`,
    `/metrics` and the v2 model metadata of `model`."""
    router = APIRouter()

    def serving():
        if not model.ready:
            raise NOT_READY
        return model.dataplane

    @router.post("/classify/image", tags=["classify"], summary="Classify one uploaded image")
    async def classify_image(request: Request, response: Response,
                             file: UploadFile = File(..., description="JPEG or PNG image"),
                             top_k: int | None = Query(None, ge=1, le=10, description="also return the k best classes")):
        """Multipart field `file` -> the seed's JSON: predicted_class, confidence, all_probabilities, timestamp."""
        (result,), hit = await serving().classify([await file.read()], top_k, request.state.api_key_id)
        response.headers["X-Cache"] = "hit" if hit else "miss"
        if isinstance(result, ApiError):
            raise result
        return {**result, "timestamp": timestamp(), "model_version": model.version}

    @router.post("/classify/batch", tags=["classify"], summary="Classify several uploaded images")
    async def classify_batch(request: Request, response: Response,
                             files: list[UploadFile] = File(..., description="JPEG or PNG images"),
                             top_k: int | None = Query(None, ge=1, le=10)):
        """Multipart fields `files` -> {"results": [...]} in input order; a bad file gets an error object in its slot."""
        limit = model.settings.max_batch_files
        if len(files) > limit:
            raise PayloadTooLarge("too_many_files", f"{len(files)} files exceed the limit of {limit} per request.")
        results, hit = await serving().classify([await f.read() for f in files], top_k, request.state.api_key_id)
        response.headers["X-Cache"] = "hit" if hit else "miss"
        return {"results": [r.body() if isinstance(r, ApiError) else r for r in results], "timestamp": timestamp(),
                "model_version": model.version}

    @router.get("/v2/models/{model_name}", tags=["V2"], summary="Model metadata (v2), with how it is being served")
    async def v2_model_metadata(model_name: str, model_version: str | None = None):
        """KServe's v2 metadata, plus `versions` (the weights' sha256 prefix) and `parameters`: device,
        precision, compilation and load time, so an operator can see what a replica actually runs."""
        if model.name != model_name:
            raise NotFound("model_not_found", f"Model with name {model_name} does not exist.")
        if model_version:
            raise NotFound("not_supported", "Model versions are not served: this predictor serves one unversioned model.")
        return {"name": model.name, "versions": [model.version], "platform": model.platform,
                "inputs": model.get_input_types(), "outputs": model.get_output_types(), "parameters": model.metadata}

    @router.get("/v2", tags=["V2"], summary="Server metadata (v2)")
    async def v2_server_metadata():
        """KServe's, with the extensions this server really serves (the repository API is not)."""
        return {"name": "kserve", "version": package_metadata.version("kserve"), "extensions": SERVER_EXTENSIONS}

    @router.get("/health", tags=["health"], summary="Model loaded and a forward pass succeeded")
    async def health():
        if not (model.ready and model.forward_ok):
            return error_response(NOT_READY)
        return {"status": "healthy", "model_loaded": True, **model.metadata}

    @router.get("/metrics", tags=["metrics"], summary="Prometheus metrics of this replica (every worker process)",
                include_in_schema=False)
    async def prometheus_metrics(request: Request):
        body, content_type = metrics.exposition_of(request.headers.get("accept"))
        return Response(content=body, headers={"content-type": content_type})

    return router
