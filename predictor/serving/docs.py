"""`GET /docs`: Swagger UI served by this server, from files in a wheel, under a policy that lets the
page load nothing from anywhere else.

KServe's app gets FastAPI's page at /docs (`--enable_docs_url`, on by default:
predictor.serving.kserve_compat.before_kserve_import), which loads Swagger UI from a CDN and starts it
with an inline script: a blank page in a cluster without internet. `install_docs` puts this page in
its place at the same path. Swagger UI's files come from the `fastapi-swagger` wheel (pinned in
pyproject.toml; it is re-released with each Swagger UI release, and depends on FastAPI alone) and are
served at /docs/<file>, with the page's start-up script beside them, so that the policy can forbid
inline scripts. Only the files are used: the wheel's own `patch_fastapi` builds the page with an
inline script too, and wants FastAPI's /docs off, which KServe decides.
"""

import hashlib
import html
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

# Scripts, styles, the spec and "Try it out" calls from this server only; images also as data: URIs
# (the stylesheet's own icons, which fetch nothing); no plug-ins, frames or <base>.
POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
          "form-action 'self'")
_HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff"}

# Swagger UI's start-up, FastAPI's page's parameters less the validator badge (an image from
# validator.swagger.io). Where the spec is comes from the page (with the server's root path).
_START = b"""\"use strict\";
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""

# /docs/<name>: (file in fastapi_swagger/resources, or None for the start-up script above; media type).
ASSETS = {
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": ("favicon-32x32.png", "image/png"),
    "start.js": (None, "text/javascript; charset=utf-8"),
}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} - Swagger UI</title>
<link rel="icon" type="image/png" href="{docs}/favicon.png">
<link rel="stylesheet" href="{docs}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="{docs}/swagger-ui-bundle.js"></script>
<script src="{docs}/start.js"></script>
</body>
</html>
"""


def _asset_bytes(file: str | None) -> bytes:
    if file is None:
        return _START
    return (resources.files("fastapi_swagger") / "resources" / file).read_bytes()


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at `app.docs_url` from this server's own files, in place of FastAPI's page (none
    when the docs are off)."""
    docs_url, openapi_url = app.docs_url, app.openapi_url
    if not docs_url or not openapi_url:
        return
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != docs_url]
    assets = {name: (_asset_bytes(file), media_type) for name, (file, media_type) in ASSETS.items()}
    etags = {name: f'"{hashlib.sha256(body).hexdigest()[:32]}"' for name, (body, _) in assets.items()}
    router = APIRouter(include_in_schema=False)

    @router.get(docs_url)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        page = _PAGE.format(title=html.escape(app.title), docs=html.escape(root + docs_url, quote=True),
                            openapi=html.escape(root + openapi_url, quote=True))
        return HTMLResponse(page, headers={**_HEADERS, "Cache-Control": "no-cache"})

    @router.get(docs_url + "/{name}")
    async def swagger_ui_file(name: str, request: Request):
        if name not in assets:
            raise HTTPException(404, f"No such file: {docs_url}/{name}.")  # the error format's not_found
        body, media_type = assets[name]
        # Revalidated on each visit; the 1.6 MB bundle is sent again only when it changed (an upgrade).
        headers = {**_HEADERS, "Cache-Control": "no-cache", "ETag": etags[name]}
        if request.headers.get("if-none-match") == etags[name]:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    app.include_router(router)
