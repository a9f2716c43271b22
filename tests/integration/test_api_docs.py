"""The API's documentation pages work with no way out of the network: `/docs` and `/redoc` name nothing
outside the gateway, and the gateway serves everything they name."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import create_app
from voxlog.serving import build_gateway
from voxlog.settings import Settings

BASE = "http://gateway.internal"
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(_env_file=None, home=tmp_path, twilio_auth_token=SecretStr("docs-test"), public_url=None,
                        run_workers=False, run_projections=False)
    app = create_app(build_gateway(settings))  # the pages need no runtime: its lifespan is not started
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as http:
        yield http


def named_urls(html: str) -> list[str]:
    """What the page has the browser load: its src and href attributes, and the quoted URLs in its script."""
    attributes = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    in_script = re.findall(r"""\burl:\s*'([^']+)'|spec-url=["']([^"']+)["']""", html)
    return attributes + [url for pair in in_script for url in pair if url]


@pytest.mark.parametrize(("page", "expected"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
async def test_the_docs_pages_load_only_what_the_gateway_serves(client: httpx.AsyncClient, page: str,
                                                               expected: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # What a viewer's script would fetch elsewhere, the browser refuses (test_console_browser.py).
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    html = response.text
    outside = [url for url in re.findall(r"https?://[^\s\"'<>)]+", html) if not url.startswith(BASE)]
    assert not outside, f"{page} names URLs outside the gateway: {outside}"
    assert "fonts.googleapis" not in html
    urls = named_urls(html)
    assert any(url.endswith(expected) for url in urls), urls
    assert "/openapi.json" in urls
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200, url
        suffix = Path(url).suffix
        assert asset.headers["content-type"].split(";")[0] == CONTENT_TYPES[suffix], url
        assert asset.content, url


async def test_swagger_ui_sends_the_document_to_no_validator(client: httpx.AsyncClient) -> None:
    html = (await client.get("/docs")).text
    assert '"validatorUrl": "none"' in html  # else Swagger UI asks validator.swagger.io for a badge


async def test_only_the_docs_assets_are_served_from_their_folder(client: httpx.AsyncClient) -> None:
    for name in ("__init__.py", "..%2Fcore.py", "index.html"):
        assert (await client.get(f"/docs/assets/{name}")).status_code == 404
    assert (await client.get("/docs/oauth2-redirect")).status_code == 200
    document = (await client.get("/openapi.json")).json()
    assert not [path for path in document["paths"] if path.startswith(("/docs", "/redoc"))]
