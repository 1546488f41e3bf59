"""The interactive API docs at ``/docs/``: Swagger UI served by the service itself.

Litestar's own Swagger plugin loads the UI's JavaScript, CSS and favicon from a public CDN,
so an offline or air-gapped deployment gets a blank page. :class:`OfflineSwaggerRenderPlugin`
serves them from ``service/static/swagger-ui`` (the official ``swagger-ui-dist`` files at
the version in its ``VERSION`` file, refreshed with ``scripts/vendor-swagger-ui.sh``), under
``/docs/assets/``, and renders a page that names no other host: the spec is inlined and the
online validator badge is off.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_VERSION = (SWAGGER_UI_DIR / "VERSION").read_text(encoding="ascii").strip()
# Under the OpenAPI router's path (``/docs``): the page and its assets share one prefix.
ASSETS_PATH = "/assets"
# The files carry no version in their names, so a browser revalidates them after a day.
ASSETS_MAX_AGE_S = 24 * 3600


class OfflineSwaggerRenderPlugin(SwaggerRenderPlugin):
    """Swagger UI whose page and assets all come from this service.

    ``docs_path`` is the OpenAPI router's path (``OpenAPIConfig.path``), from which the
    asset URLs are built; ``path`` is where the page is served under it.
    """

    def __init__(self, *, docs_path: str, path: str = "/") -> None:
        assets = docs_path.rstrip("/") + ASSETS_PATH
        super().__init__(
            js_url=f"{assets}/swagger-ui-bundle.js",
            css_url=f"{assets}/swagger-ui.css",
            path=path,
            favicon=f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png'>",
        )

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The HTML page: the UI's own bundle and stylesheet, the spec inlined."""
        title = html.escape(str(openapi_schema.get("info", {}).get("title", "API")))
        # The spec is JSON inside a <script>: "</" must not close the element early.
        spec = self.render_json(request, openapi_schema).replace(b"</", b"<\\/")
        head = (
            "<!DOCTYPE html><html lang='en'><head>"
            f"<title>{title}</title>{self.favicon}"
            "<meta charset='utf-8'/>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<link href='{self.css_url}' rel='stylesheet'>"
            f"<script src='{self.js_url}'></script>"
            f"{self.style}</head>"
        )
        # validatorUrl: null, or the UI fetches a badge from the public validator.
        body = (
            b"<body><div id='swagger-ui'></div><script>"
            b"window.ui = SwaggerUIBundle({spec: " + spec + b", dom_id: '#swagger-ui',"
            b" deepLinking: true, validatorUrl: null,"
            b" presets: [SwaggerUIBundle.presets.apis]});"
            b"</script></body></html>"
        )
        return head.encode() + body

    def receive_router(self, router: Router) -> None:
        """Serve the vendored files under ``<docs path>/assets/`` (GET and HEAD)."""
        super().receive_router(router)
        router.register(
            create_static_files_router(
                path=ASSETS_PATH,
                directories=[SWAGGER_UI_DIR],
                name="swagger-ui-assets",
                cache_control=CacheControlHeader(max_age=ASSETS_MAX_AGE_S, public=True),
                include_in_schema=False,
            )
        )
