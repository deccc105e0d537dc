"""The documentation's relative links and pictures point at files that exist: a reader who follows
one from the README or docs/ never lands on a missing page or a broken image."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
# markdown links and images "](target)", and HTML images src="target"; anchors (#...) dropped
LINK = re.compile(r'(?:\]\(|src=")([^)"\s#]+)')


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, mailto: ... are not files


def test_the_link_pattern_finds_links_images_and_html_images_but_not_urls():
    text = '[a](docs/a.md) ![b](../b.png#x) <img src="c.png" width="9"> [d](https://e.org/f) [g](#anchor)'
    assert relative_links(text) == ["docs/a.md", "../b.png", "c.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_that_exists(page):
    missing = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
