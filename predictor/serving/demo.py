"""The demo page: `GET /` and its two assets, plain files shipped in the package (predictor/ui/)."""

import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from predictor.core.errors import NotFound
from predictor.model import Cifar10Classifier

UI_DIR = Path(__file__).parents[1] / "ui"
# Everything the page loads comes from this server (no CDN is reachable from a cluster); its images
# are the user's own files (blob:) and the heat-maps the API returns (data:).
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def wants_page(request: Request) -> bool:
    """A browser (Accept names text/html) gets the page at `/`; any other caller KServe's liveness JSON there,
    which KServe's v1 client (`is_server_live`) reads."""
    return "text/html" in request.headers.get("accept", "")


_ALIVE = {"status": "alive"}


def build_ui_router(model: Cifar10Classifier) -> APIRouter:
    """`GET /` (the page, for `model`'s name, to browsers) and `/ui/{asset}`; with `--ui false`, a browser
    gets a JSON 404 at `/`."""
    router = APIRouter(include_in_schema=False)
    if not model.settings.ui:
        @router.get("/")
        async def no_page(request: Request):
            # Registered anyway, so that KServe's own `/` does not stand in for the page.
            if not wants_page(request):
                return JSONResponse(_ALIVE, headers={"Vary": "Accept"})
            raise NotFound("not_found", "The demo page is turned off on this server (--ui false).")

        return router

    page = (UI_DIR / "index.html").read_text().replace("{{MODEL_NAME}}", html.escape(model.name, quote=True))
    assets = {name: (UI_DIR / name).read_bytes() for name in _ASSETS}

    @router.get("/")
    async def demo_page(request: Request):
        if not wants_page(request):
            return JSONResponse(_ALIVE, headers={"Vary": "Accept"})
        return Response(page, media_type="text/html; charset=utf-8", headers={**_HEADERS, "Vary": "Accept"})

    @router.get("/ui/{asset}")
    async def demo_asset(asset: str):
        if asset not in assets:
            raise NotFound("not_found", f"No such file: /ui/{asset}.")
        return Response(assets[asset], media_type=_ASSETS[asset], headers=_HEADERS)

    return router
