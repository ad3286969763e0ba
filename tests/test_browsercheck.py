"""The book's browser check (saelib.browsercheck) on hand-made pages: each fault it must catch is
planted once, and a clean page passes. Real headless Chromium, served from 127.0.0.1."""

from __future__ import annotations

import base64

import pytest
from browser import browser_or_skip  # tests/browser.py

from saelib.browsercheck import book_pages, check_book

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def page(body: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head><title>t</title>{head}</head><body>{body}</body></html>"


@pytest.fixture
def site(tmp_path):
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "ok.png").write_bytes(PNG)
    (tmp_path / "index.html").write_text(page('<a href="good.html#sec">ok</a> <img src="_images/ok.png">'))
    (tmp_path / "good.html").write_text(page('<h1 id="sec">s</h1><a href="index.html">home</a>'))
    (tmp_path / "missing_image.html").write_text(page('<img src="_images/nope.png">'))
    (tmp_path / "broken_link.html").write_text(page('<a href="gone.html">x</a> <a href="good.html#nosuch">y</a>'))
    (tmp_path / "js_error.html").write_text(page("<script>undefinedFunction();</script>"))
    (tmp_path / "traceback.html").write_text(page('<div class="cell_output"><div class="traceback">ValueError</div></div>'))
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "skipped.html").write_text(page("<script>alsoBroken();</script>"))
    return tmp_path


def test_each_planted_fault_is_reported_and_clean_pages_pass(site):
    chromium = browser_or_skip()
    assert "_static/skipped.html" not in book_pages(site)
    report = check_book(site, chromium=chromium)
    by_page = {p.page: p.problems for p in report.pages}
    assert by_page["index.html"] == [] and by_page["good.html"] == []
    assert any("broken image" in m for m in by_page["missing_image.html"])
    assert ("/_images/nope.png", 404) in report.bad_requests
    assert any("gone.html" in m for m in by_page["broken_link.html"])
    assert any("broken anchor" in m and "nosuch" in m for m in by_page["broken_link.html"])
    assert any("undefinedFunction" in m for m in by_page["js_error.html"])
    assert any("traceback" in m for m in by_page["traceback.html"])
    assert not report.ok


def test_a_folder_without_a_built_book_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.html"):
        check_book(tmp_path)
