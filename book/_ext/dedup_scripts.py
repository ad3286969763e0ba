"""Sphinx extension: drop repeated ``<script>`` entries from each page.

Why: with jupyter-book 1.x, sphinx-thebe and sphinx-togglebutton register their inline scripts
once per read phase, so a page can carry ``const THEBE_JS_URL = …`` twice, and the browser then
reports ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared`` on every page. The
book's browser test (``saelib.browsercheck``) fails on such errors; this removes the cause, keeping
the first of identical entries (same file, same attributes and inline body; priority ignored).
"""

from __future__ import annotations


def _dedup(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        # The two registrations differ only in filename None vs "" and in priority.
        key = (str(getattr(js, "filename", js) or ""),
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


def setup(app):
    app.connect("html-page-context", _dedup, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
