"""Linking a circuit graph's feature nodes to their pages in a dashboard site (the node attribute `dashboard`,
which the HTML export shows as a link in the node's details)."""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from circuits.dashboard.folders import site_links

LINK_ATTRIBUTE = "dashboard"


def link_feature_pages(graph: nx.DiGraph, site: str | Path, relative_to: str | Path | None = None) -> int:
    """Set `dashboard` on every feature node at the site's hook whose page the site has: a path relative to the
    folder `relative_to` (where the page linking to it will be), or else the page's absolute file:// URI.
    Returns how many nodes were linked."""
    hook, pages = site_links(site)
    linked = 0
    for _, data in graph.nodes(data=True):
        if data.get("kind") != "feature" or data.get("hook") != hook or int(data.get("index", -1)) not in pages:
            continue
        page = pages[int(data["index"])]
        if relative_to is None:
            data[LINK_ATTRIBUTE] = page.as_uri()
        else:
            data[LINK_ATTRIBUTE] = Path(os.path.relpath(page, Path(relative_to).resolve())).as_posix()
        linked += 1
    return linked
