"""Detection scoring (as in EleutherAI's delphi): given the explanation, does the model tell excerpts where the
feature fires from excerpts where it does not? Each excerpt is judged alone; the model answers Yes or No.

With `option_probabilities` (the local model) the score of an excerpt is P(Yes) / (P(Yes) + P(No)) at the
answer's first token, so AUC ranks excerpts by the model's confidence; otherwise the reply's first word is
read (Yes: 1, No: 0, anything else malformed and recorded).
"""

from __future__ import annotations

import re

from tasks.autointerp.client import MalformedResponse
from tasks.autointerp.excerpts import Excerpt

OPTIONS = ["Yes", "No"]


def detection_messages(explanation: str, excerpt: Excerpt) -> list[dict]:
    prompt = (f"A neuron of a language model is explained as: {explanation}\n\n"
              f"Text: \"{excerpt.text().strip()}\"\n\n"
              "Does this neuron fire anywhere in the text, according to the explanation? Answer Yes or No.")
    return [{"role": "user", "content": prompt}]


def parse_answer(response: str) -> float:
    match = re.match(r"^\W*(yes|no)\b", response.strip(), flags=re.IGNORECASE)
    if not match:
        raise MalformedResponse(f"not a Yes/No answer: {response[:200]!r}")
    return 1.0 if match.group(1).lower() == "yes" else 0.0


def detection_score(client, explanation: str, excerpt: Excerpt, method: str) -> float:
    """The model's belief in [0, 1] that the feature fires in `excerpt` (method as in simulate)."""
    messages = detection_messages(explanation, excerpt)
    if method == "likelihood":
        (yes, _), = client.option_probabilities([client.render(messages), ""], OPTIONS)
        return yes
    return parse_answer(client.complete(messages, max_tokens=4, temperature=0.0))
