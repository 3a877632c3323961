"""Shared pieces of the HTML reports: escaping, embedded JSON, image links, page shell.

Prompts are untrusted text, so every page builds markup only through these
helpers: `esc` for text and attributes, `script_json` for data (read back with
`JSON.parse` and put into the DOM with `textContent`), `image_src` for links.
Pages are single files that work from file://: inline CSS and JS, images linked
by relative path, nothing fetched from the network. Pages may be written to URLs
(gs://...; parti_jax/storage.py).
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import urllib.parse
from pathlib import Path
from typing import Any

from parti_jax import storage
from parti_jax.eval.records import write_atomic

CSS = """
:root { --fg: #1d1d1f; --muted: #6e6e73; --line: #d2d2d7; --bg: #fafafa; --accent: #0a66c2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 0 1.5rem 3rem; }
header { position: sticky; top: 0; background: var(--bg); padding: .75rem 0;
         border-bottom: 1px solid var(--line); z-index: 2; }
h1 { font-size: 1.35rem; margin: .25rem 0 .5rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
.muted { color: var(--muted); }
.controls { display: flex; flex-wrap: wrap; gap: .75rem; align-items: center; }
.controls label { display: inline-flex; gap: .35rem; align-items: center; }
select, input[type=search], input[type=text], button, textarea { font: inherit; }
button { cursor: pointer; border: 1px solid var(--line); background: #fff; border-radius: 6px;
         padding: .3rem .7rem; }
button.selected { background: var(--accent); color: #fff; border-color: var(--accent); }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid var(--line); padding: .25rem .6rem; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary { display: flex; flex-wrap: wrap; gap: 2rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .75rem; }
.card .prompt { font-weight: 600; white-space: pre-wrap; overflow-wrap: anywhere; }
.card .meta { color: var(--muted); font-size: .85rem; margin: .25rem 0; }
.tag { display: inline-block; border: 1px solid var(--line); border-radius: 999px;
       padding: 0 .5rem; margin-right: .25rem; font-size: .8rem; }
.images { display: flex; flex-wrap: wrap; gap: .4rem; margin-top: .5rem; }
figure { margin: 0; }
figure img { width: 128px; height: 128px; object-fit: contain; background: #eee;
             image-rendering: auto; display: block; }
figcaption { font-size: .75rem; color: var(--muted); text-align: center; }
.hidden { display: none !important; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.side { border: 1px solid var(--line); border-radius: 6px; padding: .5rem; background: #fff; }
.vote { display: flex; gap: .5rem; margin-top: .5rem; }
textarea { width: 100%; min-height: 6rem; }
.badge { display: inline-block; padding: 0 .4rem; border-radius: 4px; background: #fde68a; }
"""


def esc(value: Any) -> str:
    """Escapes text for HTML element content and quoted attribute values."""
    return html.escape(str(value), quote=True)


# Characters that could end a <script> element or a JS line, written as \uXXXX.
_SCRIPT_ESCAPES = {c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}


def script_json(data: Any) -> str:
    """JSON text that is safe inside a `<script>` element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "".join(_SCRIPT_ESCAPES.get(ch, ch) for ch in text)


def json_script_tag(element_id: str, data: Any) -> str:
    """A `<script type="application/json">` element holding `data`."""
    return f'<script type="application/json" id="{esc(element_id)}">{script_json(data)}</script>'


def image_src(path: str | os.PathLike) -> str:
    """A relative POSIX path as a URL: each segment percent-encoded (':' included)."""
    parts = str(path).replace(os.sep, "/").split("/")
    return "/".join(urllib.parse.quote(p, safe="") for p in parts)


def relative_path(target: str | os.PathLike, start_dir: str | os.PathLike) -> str:
    """`target` relative to the folder `start_dir`, with '/' separators (for links); URLs
    in the same bucket are related by their paths, in another the target's URL is kept."""
    if storage.is_url(target) or storage.is_url(start_dir):
        url, start = os.fspath(storage.path(target)), os.fspath(storage.path(start_dir))
        bucket, _, key = url.partition("://")[2].partition("/")
        start_bucket, _, start_key = start.partition("://")[2].partition("/")
        if url.split("://")[0] != start.split("://")[0] or bucket != start_bucket:
            return url
        return posixpath.relpath("/" + key, "/" + start_key)
    rel = os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())
    return rel.replace(os.sep, "/")


def folder_prefix(folder: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """What leads from a page in `page_dir` to files in `folder`: "" or "<relative path>/"."""
    rel = relative_path(folder, page_dir)
    return "" if rel == "." else rel + "/"


def img_tag(src_path: str, *, title: str = "", caption: str | None = None) -> str:
    """An `<img>` in a `<figure>`, lazily loaded, with an optional caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption is not None else ""
    return (
        f'<figure><img loading="lazy" src="{esc(image_src(src_path))}" '
        f'alt="{esc(title)}" title="{esc(title)}">{cap}</figure>'
    )


def table(headers: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset()) -> str:
    """A plain table; every cell escaped; columns in `numeric` right-aligned."""

    def cells(tag: str, values: list[Any]) -> str:
        return "".join(
            f"<{tag}{' class=num' if i in numeric else ''}>{esc(v)}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><thead><tr>{cells('th', headers)}</tr></thead><tbody>{body}</tbody></table>"


def metrics_table(metrics: dict[str, Any]) -> str:
    """`flatten_metrics` rows as a two-column table."""
    return table(["metric", "value"], [list(row) for row in flatten_metrics(metrics)])


# Query helpers every page script may use.
_JS_HELPERS = """const $ = (s, el) => (el || document).querySelector(s);
const $$ = (s, el) => Array.from((el || document).querySelectorAll(s));
"""


def page(title: str, body: str, *, script: str = "", head_extra: str = "") -> str:
    """A whole HTML document: inline CSS, `body` markup (already escaped), inline JS (`script`:
    trusted code written by parti_jax, never built from prompts; data goes in json_script_tag)."""
    if "</script" in script.lower():
        raise ValueError("page script must not contain '</script'; pass data via json_script_tag")
    js = f"<script>\n'use strict';\n{_JS_HELPERS}{script}\n</script>" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style>{head_extra}</head>\n"
        f"<body>\n{body}\n{js}\n</body></html>\n"
    )


def write_page(path: str | os.PathLike, title: str, body: str, **page_kwargs: str) -> storage.Path:
    """Writes `page(title, body, ...)` atomically, so a reader never sees half a page."""
    return write_atomic(path, page(title, body, **page_kwargs))


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; None as "n/a"."""
    return "n/a" if value is None else f"{100.0 * float(value):.1f}%"


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested metrics as (dotted key, text) rows for a summary table."""
    rows: list[tuple[str, str]] = []
    for key in sorted(metrics):
        value = metrics[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten_metrics(value, name + "."))
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        else:
            rows.append((name, json.dumps(value) if not isinstance(value, str) else value))
    return rows
