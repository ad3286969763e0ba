"""``python -m saelib.browsercheck _build/html``: load every page of the built book in a real browser.

Why a browser and not an HTML parser: a page can be valid HTML and still show a broken figure (an
image path that 404s), fail in its scripts, or render an executed notebook's traceback. Here each
page is served from 127.0.0.1 and loaded by headless Chromium (Debian's ``chromium``), which
fetches every image, stylesheet and script the page asks for, exactly as a reader's browser does.

What fails a page:

* a resource on this server that answers an error status (the server logs every request), or an
  ``<img>`` the browser could not decode (``naturalWidth == 0``);
* a JavaScript error or ``console.error`` raised by a local script (an injected probe records
  them; resources on other hosts, e.g. a CDN for MathJax, are unreachable offline and only listed);
* an internal link (``href`` to this site) whose target file does not exist, or whose ``#anchor``
  is not an ``id`` in the target page;
* an executed-notebook error output (MyST-NB renders it with the ``traceback`` class).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

PROBE_ID = "__saelib_browsercheck"
#: Injected first in every page's <head>: records errors, then writes them into the DOM on load.
PROBE = """<script>
(function () {
  var errs = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) { errs.push({kind: 'resource', url: t.src || t.href}); }
    else { errs.push({kind: 'js', message: String(e.message), source: String(e.filename || '')}); }
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    errs.push({kind: 'js', message: 'unhandled rejection: ' + String(e.reason), source: ''});
  });
  var ce = console.error;
  console.error = function () {
    errs.push({kind: 'console', message: Array.prototype.join.call(arguments, ' '), source: ''});
    return ce.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    setTimeout(function () {
      var imgs = Array.prototype.slice.call(document.images);
      var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                    .map(function (i) { return i.currentSrc || i.src; });
      var pre = document.createElement('pre');
      pre.id = '%s';
      pre.textContent = JSON.stringify({errors: errs, broken_images: bad, images: imgs.length,
                                        url: location.href});
      document.body.appendChild(pre);
    }, 300);
  });
})();
</script>""" % PROBE_ID


class BrowserNotFound(RuntimeError):
    """No Chromium binary: install Debian's ``chromium`` (``.ci/run`` does)."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotFound("no Chromium found on PATH: install it (Debian: apt-get install chromium)")


@dataclass
class PageReport:
    page: str
    problems: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    images: int = 0


@dataclass
class BookReport:
    pages: list[PageReport]
    bad_requests: list[tuple[str, int]]

    @property
    def problems(self) -> list[str]:
        out = [f"{p.page}: {msg}" for p in self.pages for msg in p.problems]
        return out + [f"HTTP {status} for {path}" for path, status in self.bad_requests]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Handler(SimpleHTTPRequestHandler):
    """Serves the book, injects the probe into HTML pages, logs (path, status) of every request."""

    log: list[tuple[str, int]]

    def __init__(self, *args, log: list, **kwargs):
        self.log = log
        super().__init__(*args, **kwargs)

    def send_response(self, code, message=None):
        self.log.append((unquote(urlsplit(self.path).path), int(code)))
        super().send_response(code, message)

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix == ".html" and path.is_file():
            html = path.read_text(encoding="utf-8", errors="replace")
            m = re.search(r"<head[^>]*>", html, flags=re.I)
            at = m.end() if m else 0
            body = (html[:at] + PROBE + html[at:]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

            return io.BytesIO(body)
        return super().send_head()

    def log_message(self, format, *args):  # quiet: the log list is the record
        pass


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.probe = ""
        self.traceback = False
        self._in_probe = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        classes = (a.get("class") or "").split()
        if "traceback" in classes or "output_error" in classes:
            self.traceback = True
        self._in_probe = a.get("id") == PROBE_ID

    def handle_endtag(self, tag):
        self._in_probe = False

    def handle_data(self, data):
        if self._in_probe:
            self.probe += data


def _ids_of(path: Path) -> set[str]:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p.ids


def book_pages(root: Path) -> list[str]:
    """Every HTML page of a built book, relative to ``root`` (Sphinx's own folders excluded)."""
    skip = {"_static", "_sources", "_images", "_downloads"}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.html")
                  if not (set(p.relative_to(root).parts) & skip))


def _load(chromium: str, url: str, timeout: float) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--virtual-time-budget=10000",
           "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode} on {url}: {done.stderr[-500:]}")
    return done.stdout


def check_page(chromium: str, base: str, root: Path, page: str, timeout: float) -> PageReport:
    report = PageReport(page)
    dom = _load(chromium, urljoin(base, page), timeout)
    parsed = _Links()
    parsed.feed(dom)
    if not parsed.probe:
        report.problems.append("the page never finished loading (no probe result)")
    else:
        probe = json.loads(parsed.probe)
        report.images = probe["images"]
        for src in probe["broken_images"]:
            (report.problems if src.startswith(base) else report.external).append(f"broken image {src}")
        for err in probe["errors"]:
            url = err.get("url") or err.get("source") or ""
            local = url.startswith(base) or (err["kind"] != "resource" and not url)
            text = f"{err['kind']} error: {err.get('message') or url}"
            (report.problems if local else report.external).append(text)
    if parsed.traceback:
        report.problems.append("an executed notebook's error output (traceback) is on the page")
    # A redirect page (the book's index.html) ends on another page: links resolve against that.
    page_url = (probe.get("url") if parsed.probe else None) or urljoin(base, page)
    page_url = page_url.split("#")[0]
    for href in parsed.hrefs:
        target = urljoin(page_url, href)
        if not target.startswith(base) or href.startswith(("mailto:", "javascript:")):
            continue
        parts = urlsplit(target)
        rel = unquote(parts.path)[len(urlsplit(base).path):]
        path = root / rel
        if path.is_dir() or rel == "":
            path = path / "index.html"
        if not path.exists():
            report.problems.append(f"broken link {href!r} (no {rel or 'index.html'})")
        elif parts.fragment and path.suffix == ".html" and unquote(parts.fragment) not in _ids_of(path):
            report.problems.append(f"broken anchor {href!r}")
    return report


def check_book(root: str | Path, pages: list[str] | None = None, *, chromium: str | None = None,
               timeout: float = 60.0, workers: int = 2) -> BookReport:
    """Serve ``root`` on 127.0.0.1 and check ``pages`` (default: all) in headless Chromium."""
    root = Path(root).resolve()
    if not (root / "index.html").exists():
        raise FileNotFoundError(f"{root}: no index.html; build the book first (make book)")
    chromium = chromium or find_chromium()
    log: list[tuple[str, int]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root), log=log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reports = list(pool.map(lambda p: check_page(chromium, base, root, p, timeout),
                                    pages if pages is not None else book_pages(root)))
    finally:
        server.shutdown()
        server.server_close()
    # Browsers ask every site for /favicon.ico on their own; the book does not reference one.
    bad = sorted({(path, status) for path, status in log if status >= 400 and path != "/favicon.ico"})
    return BookReport(reports, bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.browsercheck", description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="_build/html")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        report = check_book(args.root, workers=args.workers)
    except (FileNotFoundError, BrowserNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_img = sum(p.images for p in report.pages)
    print(f"{len(report.pages)} pages, {n_img} images loaded in Chromium; "
          f"{len(report.problems)} problems")
    for problem in report.problems:
        print(f"  {problem}")
    external = sorted({e for p in report.pages for e in p.external})
    if external:
        print(f"  ({len(external)} external resources not checked offline, e.g. {external[0]})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
