"""The README's error-code catalogue is the catalogue of ``service.codes``: no code missing,
none invented."""

from __future__ import annotations

import re
from pathlib import Path

from service.codes import DESCRIPTIONS, ErrorCode

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_catalogue() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Error codes", 1)[1].split("\n### ", 1)[0]
    return dict(re.findall(r"^\| `([a-z0-9_]+)` \| (.+) \|$", section, re.M))


def test_every_code_has_a_description() -> None:
    assert set(DESCRIPTIONS) == set(ErrorCode)
    assert all(text.strip() for text in DESCRIPTIONS.values())


def test_readme_lists_the_catalogue_exactly() -> None:
    listed = _readme_catalogue()
    assert listed == {code.value: DESCRIPTIONS[code] for code in ErrorCode}
