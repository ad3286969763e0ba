"""Chromium for the book's browser tests: required under CI (``.ci/run`` installs Debian's
``chromium``), skipped with a reason on a workstation without it."""

from __future__ import annotations

import os

import pytest


def browser_or_skip() -> str:
    from saelib.browsercheck import BrowserNotFound, find_chromium

    try:
        return find_chromium()
    except BrowserNotFound as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
