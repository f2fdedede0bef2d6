"""Autointerp (Bills et al. 2023, as used by Cunningham et al.): a model explains each feature from its top and
quantile excerpts, simulates its activations from the explanation alone, and the correlation of simulated with
true activations scores the explanation; detection scoring (EleutherAI's delphi) asks whether the model tells
activating from non-activating excerpts.

- client: the `Client` interface, `HttpClient` (OpenAI-compatible), `LocalClient` (transformers), errors
- cache: `CachedClient` (prompts and responses on disk, atomic files)
- excerpts / examples: excerpts and how they are chosen from the dashboard collection
- explain, simulate, detection: the three prompts and their parsing
- scoring: correlation, AUC, balanced accuracy, bootstrap intervals
- run: `interpret_features` (explain, simulate, shuffled control, detect)
- serve: a tiny OpenAI-compatible server around a client
"""

from tasks.autointerp.cache import CachedClient, write_json_atomically
from tasks.autointerp.client import Client, EndpointError, HttpClient, LocalClient, MalformedResponse
from tasks.autointerp.examples import (ExcerptSettings, FeatureExcerpts, TokenTexts, eligible_rows, feature_excerpts,
                                       random_window_codes)
from tasks.autointerp.excerpts import Excerpt
from tasks.autointerp.run import FeatureResult, derangement, interpret_features
from tasks.autointerp.scoring import accuracy, auc, mean_with_interval, pearson, simulation_score
from tasks.autointerp.simulate import METHODS

__all__ = [
    "CachedClient", "write_json_atomically", "Client", "EndpointError", "HttpClient", "LocalClient",
    "MalformedResponse", "ExcerptSettings", "FeatureExcerpts", "TokenTexts", "eligible_rows", "feature_excerpts",
    "random_window_codes", "Excerpt", "FeatureResult", "derangement", "interpret_features", "accuracy", "auc",
    "mean_with_interval", "pearson", "simulation_score", "METHODS",
]
