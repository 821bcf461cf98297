"""The README stays short and every link in it and in docs/ leads to a file that exists."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "pip install -e . && .venv/bin/python -m onnxsnp models/digits_vit.onnx" in text  # the two commands
    assert '.venv/bin/pip install torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest' in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#")[0]
        if path:
            assert (page.parent / path).exists(), f"{page.name}: {target}"
        else:  # an anchor on the same page
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}
            assert target[1:] in headings, f"{page.name}: {target}"
