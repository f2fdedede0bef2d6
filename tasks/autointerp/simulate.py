"""Simulate: from an explanation alone, predict a feature's activation on every token of an excerpt.

Two ways, chosen per client:

- `likelihood` (clients with `option_probabilities`, e.g. the local model): the "all at once" simulator of
  Bills et al. (2023). The prompt lists the excerpt one token per line, `token<TAB>unknown`, after a worked
  example; one forward pass reads, at each token's slot, the model's next-token probabilities of the digits
  0-9, and the simulated activation is their expected value. A weak model never has to produce a format,
  so nothing is malformed, and the prediction is graded rather than a hard guess.
- `generate` (any chat client, e.g. HTTP): the model is asked for one `index<TAB>activation` line per
  token (0-10) and the reply is parsed; a reply that does not give every token a number is malformed.
"""

from __future__ import annotations

import re

from tasks.autointerp.client import MalformedResponse
from tasks.autointerp.excerpts import Excerpt, shown_token

METHODS = ("auto", "likelihood", "generate")
DIGITS = [str(digit) for digit in range(10)]
HEADER = ("We are studying neurons in a neural network. Each neuron looks for one particular thing in a short "
          "document. Read the explanation of what the neuron does, and predict its activation on each token, from 0 "
          "(does not fire) to 9 (fires the most).\n\n"
          "Neuron 1\nExplanation: the word \"cat\" and other animals\nActivations:\n<start>\n"
          "The\t0\n cat\t9\n sat\t0\n on\t0\n the\t0\n dog\t6\n<end>\n\n")
FILL = "unknown"


def likelihood_segments(explanation: str, excerpt: Excerpt) -> list[str]:
    """The prompt in pieces: a slot (where the digit would be read) after every piece but the last."""
    segments = [f"{HEADER}Neuron 2\nExplanation: {explanation}\nActivations:\n<start>\n"]
    for position, token in enumerate(excerpt.tokens):
        segments[-1] += f"{shown_token(token)}\t"
        segments.append(f"{FILL}\n")
    segments[-1] += "<end>\n"
    return segments


def simulate_likelihood(client, explanation: str, excerpt: Excerpt) -> list[float]:
    """Expected digit (0-9) at each token's slot."""
    probabilities = client.option_probabilities(likelihood_segments(explanation, excerpt), DIGITS)
    return [sum(p * digit for digit, p in enumerate(row)) for row in probabilities]


def generation_messages(explanation: str, excerpt: Excerpt) -> list[dict]:
    listing = "\n".join(f"{index}\t{shown_token(token)}" for index, token in enumerate(excerpt.tokens, 1))
    prompt = (f"A neuron of a language model is explained as: {explanation}\n\n"
              "Predict its activation on each token below, from 0 (does not fire) to 10 (fires the most). Reply with "
              "exactly one line per token, `index<TAB>activation`, and nothing else.\n\n"
              f"Tokens (index<TAB>token):\n{listing}")
    return [{"role": "user", "content": prompt}]


def parse_simulation(response: str, n_tokens: int) -> list[float]:
    """Activations 0-10 by index from `index<sep>value` lines; MalformedResponse unless every index has one."""
    values: dict[int, float] = {}
    for line in response.splitlines():
        match = re.match(r"^\s*(\d+)\b.*?(\d+(?:\.\d+)?)\s*$", line)  # index first, value last
        if match and 1 <= int(match.group(1)) <= n_tokens:
            values.setdefault(int(match.group(1)), min(max(float(match.group(2)), 0.0), 10.0))
    if len(values) < n_tokens:
        raise MalformedResponse(f"the simulation gave numbers for {len(values)} of {n_tokens} tokens: "
                                f"{response[:200]!r}")
    return [values[index] for index in range(1, n_tokens + 1)]


def simulate_generate(client, explanation: str, excerpt: Excerpt) -> list[float]:
    response = client.complete(generation_messages(explanation, excerpt), max_tokens=8 * len(excerpt.tokens) + 16,
                               temperature=0.0)
    return parse_simulation(response, len(excerpt.tokens))


def resolve_method(client, method: str = "auto") -> str:
    if method not in METHODS:
        raise ValueError(f"--simulation {method!r}: choose one of {', '.join(METHODS)}")
    likely = bool(getattr(client, "supports_likelihood", False))
    if method == "auto":
        return "likelihood" if likely else "generate"
    if method == "likelihood" and not likely:
        raise ValueError("--simulation likelihood needs next-token probabilities, which only the local client "
                         "offers; use --simulation generate with an HTTP client")
    return method


def simulate(client, explanation: str, excerpt: Excerpt, method: str) -> list[float]:
    """Simulated activations, one per token of `excerpt` (method: 'likelihood' or 'generate')."""
    if method == "likelihood":
        return simulate_likelihood(client, explanation, excerpt)
    return simulate_generate(client, explanation, excerpt)
