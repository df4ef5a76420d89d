"""/openapi.json as the server answers: KServe's and FastAPI's generated document, corrected.

Generated, it lists the refused repository routes, declares only 200/422 everywhere (while the
guard and the handlers answer 400/401/404/413/415/429/503/504) and calls `/metrics` JSON. `describe`
makes the app serve a document with the errors each route gives (in the form its path uses:
predictor.serving.http_errors) and the real media types.
"""

from fastapi import FastAPI

_ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {"error": {
    "type": "object", "required": ["code", "message"], "additionalProperties": False,
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
# The Open Inference Protocol's error ({"error": "<message>"}) with the code beside it.
_OIP_ERROR = {"type": "object", "required": ["error", "code"], "additionalProperties": False,
              "properties": {"error": {"type": "string"}, "code": {"type": "string"}}}

_WHY = {400: "Bad request (invalid image, tensor, base64 or JSON)", 401: "API keys are on and none valid was sent",
        404: "No such model, model version or resource", 405: "Method not allowed", 409: "The job has already finished",
        413: "Body, image or image count over its limit", 415: "Not a JPEG or PNG, or an unsupported Content-Encoding",
        422: "The request does not match the API", 429: "Over the per-caller rate limit (Retry-After)",
        503: "Shutting down, saturated, not ready, or the job store unreachable (Retry-After)",
        504: "The call did not complete within its deadline"}
# Every call through the guard's gates (predictor.serving.guard): a key, a rate, the in-flight limit, the deadline.
_GATED = (401, 429, 503, 504)
_PREDICTION = (400, 404, 413, 415, 422, *_GATED)
_JOB_READ = (404, 422, *_GATED)
_JOB_CANCEL = (404, 409, 422, *_GATED)
_READ = (404, 503)


def _errors(path: str, method: str) -> tuple[int, ...]:
    """The error statuses a route can answer (their set is what schemathesis' status_code_conformance checks)."""
    if path.startswith("/classify/jobs/"):
        return _JOB_READ if method == "get" else _JOB_CANCEL
    if method == "post":
        return _PREDICTION
    if path.startswith(("/v1/models/", "/v2/models/", "/health", "/v2/health/ready")):
        return _READ
    return ()


def _corrected(schema: dict) -> dict:
    schema["paths"] = {path: item for path, item in schema["paths"].items() if not path.startswith("/v2/repository/")}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"], schemas["OIPError"] = _ERROR, _OIP_ERROR
    # An empty upload is a 400 (empty_file) and no files a 422; an empty file among a batch's gets its error in its slot.
    image = schemas.get("Body_classify_image_classify_image_post", {}).get("properties", {}).get("file")
    if image is not None:
        image["minLength"] = 1
    batch = schemas.get("Body_classify_batch_classify_batch_post", {}).get("properties", {}).get("files")
    if batch is not None:
        batch["minItems"] = 1
    for path, item in schema["paths"].items():
        ref = {"$ref": "#/components/schemas/" + ("OIPError" if path.startswith("/v2/") else "Error")}
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for status in _errors(path, method):
                responses[str(status)] = {"description": _WHY[status], "content": {"application/json": {"schema": ref}}}
    metrics = schema["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    root = schema["paths"].get("/", {}).get("get")
    if root is not None:  # predictor.serving.demo: the page to browsers, KServe's liveness JSON to everyone else
        root["responses"]["200"]["content"] = {
            "application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}},
            "text/html": {"schema": {"type": "string"}}}
    return schema


def describe(app: FastAPI) -> None:
    """Serve the corrected document at /openapi.json (generated once, on the first request)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _corrected(generate())
        return app.openapi_schema

    app.openapi = openapi
