"""The seed's HTTP API (and what KServe's own routes lack), built for one classifier.

`build_router(model)` returns the routes; `predictor.app.install` puts them on the app ahead of
KServe's own, so `/health` and `/metrics` here win over KServe's. The multipart routes call the data
plane (predictor.dataplane) directly.

The hot routes, `POST /classify/image` and `POST /v2/models/{name}/infer`, are plain Starlette
endpoints: FastAPI's per-request machinery (dependency solving, validation models, response encoding)
buys them nothing. /classify/image checks its query parameter and form field in its own words; a
FastAPI route with the same signature follows it only to describe it in /openapi.json (and /docs). The
v2 route reads the body itself (predictor.payloads.v2_request: binary inputs stay bytes) and runs the
kserve.Model's steps as KServe's own handler would (Cifar10Classifier.infer); KServe's route, after it,
still describes it.
"""

from importlib import metadata as package_metadata

import orjson
from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException
from starlette.routing import Route

from predictor.core import metrics
from predictor.core.errors import ApiError, InvalidRequest, NotFound, PayloadTooLarge, Unavailable, UnprocessableRequest
from predictor.model import Cifar10Classifier
from predictor.payloads import SERVER_EXTENSIONS, timestamp, v2_request
from predictor.serving.http_errors import error_response
from predictor.serving.single_part import single_file_part

NOT_READY = Unavailable("model_not_ready", "The model is not loaded yet.")
MAX_TOP_K = 10


def top_k_of(request: Request) -> int | None:
    """The `top_k` query parameter: absent, or an integer from 1 to MAX_TOP_K (else 422, as FastAPI's
    validation answers on the other routes)."""
    raw = request.query_params.get("top_k")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= MAX_TOP_K):
        raise UnprocessableRequest("invalid_request", f"query.top_k: must be an integer from 1 to {MAX_TOP_K}.")
    return int(raw)


async def uploaded_file(request: Request, field: str) -> bytes:
    """The bytes of the multipart file part `field`: the one-part body clients send found directly
    (predictor.serving.single_part), any other parsed as FastAPI parses a File() parameter (the same
    parser and limits: a malformed body is its 400, a missing or non-file field a 422)."""
    try:
        body = await request.body()
        upload = single_file_part(request.headers.get("content-type", "").encode("latin-1"), body, field)
        if upload is not None:
            return upload
        form = await request.form()
    except HTTPException:  # the parser's refusals (400), or the guard's size limit met while reading
        raise
    except Exception:  # noqa: BLE001: as FastAPI answers any other failure to parse a body
        raise InvalidRequest("bad_request", "There was an error parsing the body") from None
    try:
        upload = form.get(field)
        if not isinstance(upload, StarletteUploadFile):
            raise UnprocessableRequest("invalid_request", f"body.{field}: a multipart file field `{field}` is required.")
        return await upload.read()
    finally:
        await form.close()


def build_router(model: Cifar10Classifier) -> APIRouter:
    """`/classify/image`, `/classify/batch` (through the result cache: `X-Cache: hit|miss`), `/health`,
    `/metrics` and the v2 model metadata of `model`."""
    router = APIRouter()

    def serving():
        if not model.ready:
            raise NOT_READY
        return model.dataplane

    async def classify_image(request: Request) -> Response:
        top_k = top_k_of(request)
        dataplane = serving()
        (result,), hit = await dataplane.classify([await uploaded_file(request, "file")], top_k, request.state.api_key_id)
        if isinstance(result, ApiError):
            raise result
        body = orjson.dumps({**result, "timestamp": timestamp(), "model_version": model.version})
        return Response(body, media_type="application/json", headers={"X-Cache": "hit" if hit else "miss"})

    router.add_route("/classify/image", classify_image, methods=["POST"], include_in_schema=False)

    # Matched only by the document: the endpoint above comes first. Its signature is the route's schema.
    @router.post("/classify/image", tags=["classify"], summary="Classify one uploaded image",
                 responses={200: {"headers": {"X-Cache": {"description": "hit or miss", "schema": {"type": "string"}}}}})
    async def classify_image_described(request: Request, file: UploadFile = File(..., description="JPEG or PNG image"),
                                       top_k: int | None = Query(None, ge=1, le=MAX_TOP_K,
                                                                 description="also return the k best classes")):
        """Multipart field `file` -> the seed's JSON: predicted_class, confidence, all_probabilities, timestamp."""
        return await classify_image(request)

    async def v2_infer(request: Request) -> Response:
        model_name = request.path_params["model_name"]
        if model_name != model.name:
            raise NotFound("model_not_found", f"Model with name {model_name} does not exist.")
        if request.query_params.get("model_version"):
            raise NotFound("not_supported", "Model versions are not served: this predictor serves one unversioned model.")
        if not model.ready:
            raise NOT_READY
        json_length = request.headers.get("inference-header-content-length")
        infer_request = v2_request(await request.body(), None if json_length is None else int(json_length), model_name)
        response = await model.infer(infer_request)
        body, json_length = response.to_rest()
        if json_length is not None:  # binary outputs: a JSON header, then their bytes
            return Response(body, media_type="application/octet-stream",
                            headers={"inference-header-content-length": str(json_length)})
        body["outputs"] = [{k: v for k, v in o.items() if k != "parameters" or v is not None} for o in body["outputs"]]
        return Response(orjson.dumps({k: v for k, v in body.items() if k != "parameters" or v is not None}),
                        media_type="application/json")

    router.add_route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"], include_in_schema=False)

    @router.post("/classify/batch", tags=["classify"], summary="Classify several uploaded images")
    async def classify_batch(request: Request, response: Response,
                             files: list[UploadFile] = File(..., description="JPEG or PNG images"),
                             top_k: int | None = Query(None, ge=1, le=MAX_TOP_K)):
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


def plain_routes(router: APIRouter) -> list[Route]:
    """The router's plain Starlette routes (the hot ones: no FastAPI machinery of their own), which the
    guard may call without the framework's middleware and routing (predictor.serving.guard)."""
    return [route for route in router.routes if type(route) is Route]

