"""Explain: the model reads a feature's top-activating and quantile excerpts and writes a one-line explanation."""

from __future__ import annotations

import re

from tasks.autointerp.client import MalformedResponse
from tasks.autointerp.excerpts import Excerpt, strongest_tokens

SYSTEM = ("You are a meticulous interpretability researcher. You look at text excerpts where a neuron of a language "
          "model fires and say, in one short line, what it responds to.")
MAX_EXPLANATION_CHARS = 200


def explanation_messages(top: list[Excerpt], quantiles: list[Excerpt]) -> list[dict]:
    """The chat asking for an explanation: top excerpts, then weaker ones, the firing tokens marked <<like this>>."""
    lines = ["In each excerpt the tokens where the neuron fires most are marked <<like this>>.", ""]
    lines += [f"Excerpt {number}: {excerpt.marked()}" for number, excerpt in enumerate(top, 1)]
    if quantiles:
        lines += ["", "Excerpts where it fires more weakly:"]
        lines += [f"Excerpt {number}: {excerpt.marked()}" for number, excerpt in enumerate(quantiles, len(top) + 1)]
    tokens = ", ".join(f'"{token}"' for token in strongest_tokens(top))
    lines += ["", f"Tokens it fires on most: {tokens}.", "",
              "In one short line, what does this neuron respond to? Reply with the explanation only."]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_explanation(response: str) -> str:
    """The first non-empty line, without a leading "Explanation:" or quotes; MalformedResponse when nothing is left."""
    for line in response.splitlines():
        line = re.sub(r"^\s*(explanation|answer|the neuron responds to)\s*[:\-]\s*", "", line.strip(),
                      flags=re.IGNORECASE).strip().strip("\"'`*").strip()
        if re.search(r"[A-Za-z]", line):
            return line[:MAX_EXPLANATION_CHARS]
    raise MalformedResponse(f"no explanation in the response {response[:200]!r}")


def explain(client, top: list[Excerpt], quantiles: list[Excerpt], max_tokens: int = 48) -> tuple[str, str]:
    """(explanation, raw response); MalformedResponse (carrying the raw response) when it holds no explanation."""
    response = client.complete(explanation_messages(top, quantiles), max_tokens=max_tokens, temperature=0.0)
    try:
        return parse_explanation(response), response
    except MalformedResponse as error:
        error.response = response
        raise
