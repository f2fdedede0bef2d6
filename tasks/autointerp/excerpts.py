"""Excerpts (a window of tokens with one feature's activation on each) and how prompts show them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Excerpt:
    tokens: tuple[str, ...]  # the token texts, in order
    activations: tuple[float, ...]  # the feature's activation at each token (>= 0)

    def __post_init__(self):
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"an excerpt needs one activation per token, got {len(self.tokens)} tokens and "
                             f"{len(self.activations)} activations")

    @property
    def maximum(self) -> float:
        return max(self.activations, default=0.0)

    def text(self) -> str:
        return "".join(self.tokens)

    def marked(self, fraction: float = 0.5) -> str:
        """The text with the tokens at >= `fraction` of the excerpt's maximum marked <<like this>>."""
        top = self.maximum
        if top <= 0:
            return self.text()
        return "".join(f"<<{token}>>" if value >= fraction * top else token
                       for token, value in zip(self.tokens, self.activations))


def shown_token(token: str) -> str:
    """A token as one line of a per-token listing: newlines and tabs written as escapes."""
    return token.replace("\n", "\\n").replace("\t", "\\t")


def strongest_tokens(excerpts: list[Excerpt], n: int = 5) -> list[str]:
    """The distinct token texts (stripped) at the excerpts' maxima, strongest first."""
    pairs = sorted(((value, token.strip()) for excerpt in excerpts
                    for token, value in zip(excerpt.tokens, excerpt.activations) if value > 0 and token.strip()),
                   reverse=True)
    seen: list[str] = []
    for _, token in pairs:
        if token not in seen:
            seen.append(token)
        if len(seen) == n:
            break
    return seen
