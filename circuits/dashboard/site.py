"""The static dashboard site: works from file:// with no network.

    site/index.html                 every feature, sortable (density, max activation), searchable (top tokens),
                                    paged client-side (PAGE_SIZE rows a page) over data/index.js
    site/features/<index>.html      one page per feature; its data in data/features-<chunk>.js
    site/assets/                    dashboard.js, dashboard.css, errors.js (package data, copied)
    site/dashboard.json             what the site covers (hook, model, source, feature indices): read by
                                    `export`/`trace --dashboard` to link circuit nodes to feature pages

Data files are scripts that set a global (`window.DASHBOARD_INDEX`, `window.DASHBOARD_FEATURES`) and are
loaded with <script> tags, since fetch() of local files fails under file://. Model text only ever reaches the
page as JSON string values put into the DOM with textContent; the HTML shells escape every value they hold.
The site is written into a temporary folder beside `out` and renamed into place: never half a site.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from circuits.dashboard.collect import FeatureStatistics
from circuits.dashboard.data import SiteInfo, TokenTexts, feature_entry, index_rows
from circuits.dashboard.effects import Neighbours, TokenEffects
from circuits.dashboard.folders import SITE_FILE, SITE_SCHEMA, SiteError, check_site_folder, feature_page

PAGE_SIZE = 100  # index rows per page
CHUNK_SIZE = 32  # features per data file
ASSETS = ("dashboard.js", "dashboard.css", "errors.js")
POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:"


def _shell(info: SiteInfo, *, depth: int, body_attributes: dict[str, str], scripts: list[str], heading: str,
           summary: str) -> str:
    """An HTML page that loads the style, the error catcher, its data scripts and the dashboard script."""
    up = "../" * depth
    attributes = "".join(f' data-{name}="{html.escape(value)}"' for name, value in body_attributes.items())
    script_tags = "".join(f'<script src="{up}{html.escape(src)}"></script>\n' for src in scripts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(POLICY)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(heading)}</title>\n"
        f'<link rel="stylesheet" href="{up}assets/dashboard.css">\n<script src="{up}assets/errors.js"></script>\n'
        f'</head>\n<body data-render="pending"{attributes}>\n'
        f'<header><p class="crumbs"><a href="{up}index.html">{html.escape(info.title)}</a></p>'
        f"<h1>{html.escape(heading)}</h1><p class=\"summary\">{html.escape(summary)}</p></header>\n"
        '<main id="content"><noscript>This page needs JavaScript (it runs locally; no network).</noscript></main>\n'
        '<pre id="js-errors" hidden></pre>\n'
        f"{script_tags}<script src=\"{up}assets/dashboard.js\"></script>\n</body>\n</html>\n")


def _script_data(name: str, value) -> str:
    """`window.NAME = <JSON>;` (JSON is valid JavaScript; U+2028/2029 escaped for older engines)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return f"window.{name} = " + text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + ";\n"


def _chunk_file(chunk: int) -> str:
    return f"data/features-{chunk:04d}.js"


def write_site(out: str | Path, statistics: FeatureStatistics, *, info: SiteInfo, tokenizer, effects: TokenEffects,
               neighbours: Neighbours, pages: list[int] | None = None, progress: bool = True) -> Path:
    """Write the site for the collected features into `out` (see the module docstring); `pages`: the
    dictionary indices that get a page (default: every collected feature). Returns `out`."""
    from sae.progress import progress_bar

    out = Path(out)
    check_site_folder(out)
    collected = statistics.features.tolist()
    pages = collected if pages is None else [int(index) for index in pages]
    rows = {feature: row for row, feature in enumerate(collected)}
    missing = [index for index in pages if index not in rows]
    if missing:
        raise SiteError(f"features {missing[:5]} were not collected; cannot write their pages")
    texts = TokenTexts(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for folder in ("assets", "data", "features"):
            (temporary / folder).mkdir()
        for name in ASSETS:
            (temporary / "assets" / name).write_text(_asset(name), encoding="utf-8")
        has_page = set(pages)
        summary = (f"{info.source} at {info.hook} of {info.model}: {len(pages):,} of {info.n_features_total:,} "
                   f"features over {statistics.n_tokens:,} tokens ({statistics.n_contexts:,} contexts)")
        index_data = {"info": asdict(info), "n_tokens": statistics.n_tokens, "n_contexts": statistics.n_contexts,
                      "page_size": PAGE_SIZE, "columns": ["index", "density", "max", "mean", "top_tokens"],
                      "features": [row for row in index_rows(statistics, texts) if row[0] in has_page]}
        labels = {row[0]: row[4] for row in index_data["features"]}
        (temporary / "data" / "index.js").write_text(_script_data("DASHBOARD_INDEX", index_data), encoding="utf-8")
        (temporary / "index.html").write_text(_shell(info, depth=0, body_attributes={"page": "index"},
                                                     scripts=["data/index.js"], heading=info.title, summary=summary),
                                              encoding="utf-8")
        chunks = [pages[start : start + CHUNK_SIZE] for start in range(0, len(pages), CHUNK_SIZE)]
        for number, chunk in enumerate(progress_bar(chunks, desc="dashboard: write pages", unit="chunk",
                                                    enabled=progress)):
            entries = {}
            for index in chunk:
                entry = feature_entry(statistics, rows[index], texts, effects=effects, neighbours=neighbours,
                                      labels=labels)
                position = number * CHUNK_SIZE + chunk.index(index)
                entry["prev"] = pages[position - 1] if position > 0 else None
                entry["next"] = pages[position + 1] if position + 1 < len(pages) else None
                entries[str(index)] = entry
                page = _shell(info, depth=1, body_attributes={"page": "feature", "feature": str(index)},
                              scripts=[_chunk_file(number)], heading=f"Feature {index}",
                              summary=f"{info.hook} of {info.model}, {info.source}")
                (temporary / feature_page(index)).write_text(page, encoding="utf-8")
            (temporary / _chunk_file(number)).write_text(_script_data("DASHBOARD_FEATURES", entries), encoding="utf-8")
        record = {"schema": SITE_SCHEMA, "version": 1, **asdict(info), "n_tokens": statistics.n_tokens,
                  "n_contexts": statistics.n_contexts, "features": pages, "page": "features/{index}.html"}
        (temporary / SITE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _publish(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


def _publish(temporary: Path, out: Path) -> None:
    """Rename the finished site into place (an earlier site or empty folder is moved aside first, then deleted)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes 0700; a site is meant to be shared
    check_site_folder(out)  # again: the folder may have changed during the run
    if out.is_dir():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old.tmp"))
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, out)


def _asset(name: str) -> str:
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")
