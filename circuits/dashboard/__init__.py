"""Offline feature dashboards: what a feature fires on and what it does, as a static site.

- collect: one pass over held-out text with bounded memory per feature (exact top-k contexts, a uniform
  reservoir of firing tokens for quantile examples, a log-activation histogram, counts)
- effects: logit effects of decoder directions (final norm handled as in circuits.features) and nearest
  features by decoder cosine
- data / site: the site's JSON data and the static files (index + a page per feature, file:// safe)
- links: circuit graph nodes linked to their feature pages (the HTML export shows the link)
- folders: which output folders may take a site, reading a site's record (standard library only)

Names are imported on first use, so that `circuits.dashboard.folders` stays importable without torch.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "collect": ("CollectionSettings", "FeatureCollector", "FeatureStatistics", "KeptExamples",
                "collect_feature_statistics", "quantile_bands"),
    "data": ("SiteInfo",),
    "effects": ("Neighbours", "TokenEffects", "logit_effects", "nearest_features"),
    "site": ("CHUNK_SIZE", "PAGE_SIZE", "write_site"),
    "links": ("link_feature_pages",),
    "folders": ("SITE_FILE", "SiteError", "check_site_folder", "feature_page", "read_site", "site_links"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'circuits.dashboard' has no attribute {name!r}")
    return getattr(importlib.import_module(f"circuits.dashboard.{_WHERE[name]}"), name)
