"""The README's "Python in five minutes" block runs as written (on the tiny Llama and a random SAE).

The block loads the default model and the demo's SAE; the test swaps those two paths for the tiny
test model and a saved random SAE (each substituted line must occur in the block exactly once, so
an edit of the README that breaks the substitution fails here), executes the block, and checks
what it prints: splicing is exact, five top features are listed, and switching one off changes the
logits.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Python in five minutes"
MODEL_LINE = 'load_model("smollm2-135m")'
SAE_LINE = 'load_dictionary(cache_dir() / "demo" / "saes" / "blocks.10.hook_resid_post")'


def quick_start_block() -> str:
    """The first ```python block after the SECTION heading."""
    text = README.read_text()
    assert SECTION in text, f"README has no '{SECTION}' section"
    match = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], flags=re.DOTALL)
    assert match, f"no ```python block in '{SECTION}'"
    return match.group(1)


def test_quick_start_block_runs(tiny_llama_folder, random_sae, tmp_path):
    from sae.io import save_dictionary

    sae_folder = tmp_path / "sae"
    save_dictionary(random_sae(d_in=32, d_sae=64, seed=0, hook="blocks.1.hook_resid_post"), sae_folder)
    code = quick_start_block()
    for line in (MODEL_LINE, SAE_LINE):
        assert code.count(line) == 1, f"the README block should contain {line!r} once"
    code = code.replace(MODEL_LINE, f"load_model({str(tiny_llama_folder)!r}, device='cpu')")
    code = code.replace(SAE_LINE, f"load_dictionary({str(sae_folder)!r})")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    output = printed.getvalue()

    exact = re.search(r"max \|logit difference\| (\S+)", output)
    assert exact and float(exact.group(1)) < 1e-4, output
    top = re.search(r"top features \(index, activation\): (\[.*\])", output)
    assert top and len(eval(top.group(1))) == 5, output
    change = re.search(r"max \|logit change\| from switching feature \d+ off: (\S+)", output)
    assert change and float(change.group(1)) > 0, output
