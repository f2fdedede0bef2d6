"""Which folders may take a dashboard site, and reading a site's record (standard library only: the CLI's
pre-checks use it before torch is imported)."""

from __future__ import annotations

import json
from pathlib import Path

SITE_FILE = "dashboard.json"
SITE_SCHEMA = "sparse-circuits/dashboard"


class SiteError(ValueError):
    """An output folder that cannot take a site, or a site folder that cannot be read."""


def check_site_folder(out: str | Path, flag: str = "--out") -> None:
    """`out` may be absent, an empty folder, or an earlier dashboard site (replaced); anything else is refused, so
    a mistyped --out never deletes a folder of other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SiteError(f"{flag} {out} is an existing file; give a new folder (or an earlier dashboard site to "
                        "replace)")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_FILE).is_file():
        raise SiteError(f"{flag} {out} is a folder that holds other files (no {SITE_FILE}); give a new or empty "
                        "folder (an earlier dashboard site is replaced)")


def read_site(site: str | Path, flag: str = "--dashboard") -> dict:
    """The dashboard.json of a site folder, checked: {"hook", "features", "page", ...}."""
    path = Path(site) / SITE_FILE
    if not path.is_file():
        raise SiteError(f"{flag} {site} is not a dashboard site (no {SITE_FILE}); build one with "
                        "`sparse-circuits dashboard`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SiteError(f"{path} is not valid JSON ({type(error).__name__}); build the site again") from None
    if (not isinstance(record, dict) or record.get("schema") != SITE_SCHEMA or not isinstance(record.get("hook"), str)
            or not isinstance(record.get("features"), list)
            or not all(isinstance(index, int) for index in record["features"])):
        raise SiteError(f"{path} is not a sparse-circuits dashboard record; build the site again")
    return record


def feature_page(index: int) -> str:
    """A feature's page, relative to the site folder."""
    return f"features/{int(index)}.html"


def site_links(site: str | Path, flag: str = "--dashboard") -> tuple[str, dict[int, Path]]:
    """(hook, {feature index: absolute path of its page}) for a site folder."""
    record = read_site(site, flag)
    root = Path(site).resolve()
    return record["hook"], {index: root / feature_page(index) for index in record["features"]}
