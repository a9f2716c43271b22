"""The gateway's own pages (the QA console, the widget's page) and their files: where they are, and the
headers they are served under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
JAVASCRIPT = "text/javascript"
"""JavaScript's media type (RFC 9239; application/javascript is its obsolete alias)."""
CSS = "text/css"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; media-src blob:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The pages': their own script and style only (no inline script, no other origin), fetches and sockets to
this gateway only, the console's recording from the blob the page made of it."""
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def text_file(media_type: str, description: str) -> dict[str, Any]:
    """A route's OpenAPI answer: a text file of this type."""
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def page_file(name: str, media_type: str) -> FileResponse:
    """A file of a page's, served under the pages' headers."""
    return FileResponse(STATIC / name, media_type=media_type, headers=PAGE_HEADERS)
