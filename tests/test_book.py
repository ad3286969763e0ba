"""The book build starts from an empty ``_build/``: no page of an earlier build survives."""

from __future__ import annotations

from pathlib import Path

from saelib import book


def test_build_removes_the_pages_of_an_earlier_build(tmp_path, monkeypatch):
    stale = tmp_path / "_build" / "html" / "book" / "executed" / "train" / "other-profile.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html>a page of another profile's grid</html>")
    monkeypatch.setattr(book, "ROOT", tmp_path)
    monkeypatch.setattr(book, "stage_notebooks", lambda profile: tmp_path / "book" / "executed")
    monkeypatch.setattr(book, "as_profile", lambda profile: profile)
    ran = []

    def fake_jupyter_book(cmd, check, cwd):
        ran.append(cmd)
        assert not stale.exists()  # gone before Sphinx runs
        index = Path(cwd) / "_build" / "html" / "index.html"
        index.parent.mkdir(parents=True)
        index.write_text("<html></html>")

    monkeypatch.setattr(book.subprocess, "run", fake_jupyter_book)
    index = book.build("smoke")
    assert ran and index == tmp_path / "_build" / "html" / "index.html" and index.exists()
    assert not stale.exists()
