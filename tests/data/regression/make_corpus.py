"""Writes corpus.jsonl and contexts.txt for the regression fixtures (run once; the outputs are committed).

Only words of the tiny word-level tokenizer (tests/conftest.py WORDS) are used, so nothing maps to <unk>.
Usage: python tests/data/regression/make_corpus.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = "Mary John Tom Anna James Sarah David Emma Paul Lisa Mark Alice Bob Kate Peter Rose".split()
FEMALE = set("Mary Anna Sarah Emma Lisa Alice Kate Rose".split())
PLACES = "store park school office house garden".split()
OBJECTS = "book ball gift letter ring".split()


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    pronoun = "she" if a in FEMALE else "he"
    place, thing = rng.choice(PLACES), rng.choice(OBJECTS)
    templates = [
        f"{a} and {b} went to the {place} . {a} gave a {thing} to {b} .",
        f"when {a} and {b} went to the {place} , {b} gave the {thing} to {a} .",
        f"{a} went to the {place} . then {pronoun} saw {b} there .",
        f"after {a} met {b} at the {place} , {pronoun} said it was a {thing} .",
        f"my name is {a} and I am a {'woman' if a in FEMALE else 'man'} .",
        f"{a} had a {thing} . {pronoun} took it to the {place} with {b} .",
        f"while {b} was in the {place} , {a} made a {thing} for them .",
        f"{a} got an apple and a {thing} at the {place} . {pronoun} gave them to {b} !",
    ]
    return rng.choice(templates)


def main() -> None:
    rng = random.Random(0)
    with open(HERE / "corpus.jsonl", "w") as handle:
        for d in range(600):
            text = " ".join(sentence(rng) for _ in range(4))
            handle.write(json.dumps({"id": f"d{d}", "text": text}) + "\n")
    with open(HERE / "contexts.txt", "w") as handle:
        for _ in range(6):
            handle.write(sentence(rng) + "\n")


if __name__ == "__main__":
    main()
