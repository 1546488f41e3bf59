"""Write the OpenAPI document the app serves: ``python -m service.openapi [FILE]``.

``openapi/openapi.json`` is committed and a test keeps it equal to this output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from service.app import create_app
from service.config import Settings


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an app built with default settings (nothing is opened)."""
    app = create_app(Settings())
    # Through msgspec first: the schema may hold Structs (examples) that json cannot encode.
    document: dict[str, Any] = msgspec.json.decode(
        msgspec.json.encode(app.openapi_schema.to_schema())
    )
    return document


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if len(argv) > 1:
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
