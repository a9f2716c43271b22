"""The API's documentation pages, `GET /docs` (Swagger UI) and `GET /redoc` (ReDoc), served whole by the
gateway: their scripts, stylesheet and icon come from `/docs/assets/`, not from a CDN, so the pages work
where the gateway has no way out (a customer's VPC, an air-gapped site).

The assets are the distribution files the `fastapi-offline` package ships (Swagger UI 5 and ReDoc 2,
as FastAPI's own pages load them from the CDN); only its files are used, not its FastAPI factory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_PATH = "/docs/assets"
ASSETS = Path(str(files("fastapi_offline"))) / "static"
MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",  # RFC 9239
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
"""The files served, each with its media type (stated, not guessed from the machine's MIME table)."""
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
                           "frame-ancestors 'none'")
"""Both pages may load from the gateway alone: what their scripts would fetch elsewhere (ReDoc's
"powered by" logo comes from its CDN) is refused by the browser before any request leaves. Inline
script and style stay allowed: FastAPI's pages start the viewers with an inline script."""
SWAGGER_UI_PARAMETERS = {
    # Swagger UI sends the document's URL to validator.swagger.io for a badge unless told not to: a
    # request out of the customer's network, and a broken image where there is no way out.
    "validatorUrl": "none",
}


def add_api_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Adds the two pages and their assets to an app made with `docs_url=None, redoc_url=None` (so that
    FastAPI's own, which load from a CDN, are not there)."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(f"{ASSETS_PATH}/{{name}}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        media_type = MEDIA_TYPES.get(name)
        if media_type is None:
            raise HTTPException(404)
        return FileResponse(ASSETS / name, media_type=media_type)

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return _confined(get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), **SWAGGER_UI_PARAMETERS}))

    if oauth2_redirect_url:
        @app.get(oauth2_redirect_url, include_in_schema=False)
        async def swagger_ui_oauth2_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return _confined(get_redoc_html(openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
                                        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
                                        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
                                        with_google_fonts=False))


def _root(request: Request) -> str:
    """The path the gateway is mounted under behind a proxy (ASGI's root_path), as FastAPI's own pages take it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
