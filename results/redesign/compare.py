"""Real-model regression check for issue 10 (SmolLM2-135M, small budget).

    python /work/regression_real/compare.py            # AFTER the redesign: rerun with `sparse-circuits`
                                                       # into after/, print the max abs difference per file
    python /work/regression_real/compare.py --record   # (done once) the pre-redesign code, /work/old, into expected/

The SAE folder /work/regression_real/sae (blocks.8 + blocks.10, trained once with the old code, see
COMMANDS.md) is the input of every run. Compared: every number in evaluate.json, ioi/summary.csv,
ioi/curves.csv, trace_attribution.json, trace_ablation.json, erase/erasure.csv; strings exactly
(reported as mismatches). Not compared (not results): JSON keys in EXCLUDED.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAE = HERE / "sae"
CONTEXTS = HERE / "contexts.txt"
FEATURE = "blocks.10.hook_resid_post:1945"
THREADS = "2"
OUTPUTS = ("evaluate.json", "ioi/summary.csv", "ioi/curves.csv", "trace_attribution.json",
           "trace_ablation.json", "erase/erasure.csv")
EXCLUDED = {"folder", "model", "timings_s"}  # absolute paths; wall-clock seconds


def commands(out: Path) -> list[list[str]]:
    """argv after the CLI name (`sparse-circuits` / `python -m circuits`)."""
    trace = ["trace", "--device", "cpu", "--saes", str(SAE), "--feature", FEATURE, "--depth", "1", "--top-k", "5",
             "--contexts", str(CONTEXTS), "--scan-contexts", "20", "--context-size", "32", "--seed", "0"]
    return [
        ["evaluate", "--device", "cpu", "--sae", str(SAE), "--tokens", "2000", "--json", str(out / "evaluate.json")],
        ["ioi", "--device", "cpu", "--sae", str(SAE / "blocks.10.hook_resid_post"), "--prompts", "8",
         "--baselines", "pca,neurons", "--confirm-top", "5", "--seed", "0", "--out", str(out / "ioi")],
        [*trace, "--method", "attribution", "--out", str(out / "trace_attribution.json")],
        [*trace, "--method", "ablation", "--max-candidates", "20", "--out", str(out / "trace_ablation.json")],
        ["erase", "--device", "cpu", "--sae", str(SAE), "--layers", "10", "--k", "1", "4", "--ce-tokens", "512",
         "--seed", "0", "--out", str(out / "erase")],
    ]


def run(record: bool) -> Path:
    out = HERE / ("expected" if record else "after")
    out.mkdir(exist_ok=True)
    if record:  # the pre-redesign checkout, explicitly
        prefix, cwd, env = [sys.executable, "-m", "circuits"], "/work/old", {**os.environ, "PYTHONPATH": "/work/old"}
    else:
        prefix, cwd, env = ["sparse-circuits"], None, os.environ
    for argv in commands(out):
        line = [*prefix, "--threads", THREADS, *argv]
        print("$", " ".join(line), flush=True)
        started = time.perf_counter()
        code = subprocess.run(line, cwd=cwd, env=env, stdout=subprocess.DEVNULL).returncode
        print(f"  exit {code}, {time.perf_counter() - started:.0f} s", flush=True)
        if code != 0 and record:
            sys.exit(f"the recording failed: {' '.join(line)}")
    return out


def _number(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def walk(actual, expected, where, diffs, problems):
    if isinstance(expected, dict):
        keys = {k for k in expected if k not in EXCLUDED}
        got = {k for k in actual if k not in EXCLUDED} if isinstance(actual, dict) else set()
        if keys != got:
            problems.append(f"{where}: keys differ: missing {sorted(keys - got)}, new {sorted(got - keys)}")
        for key in sorted(keys & got):
            walk(actual[key], expected[key], f"{where}.{key}", diffs, problems)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            problems.append(f"{where}: list length {len(actual) if isinstance(actual, list) else '?'} != {len(expected)}")
            return
        for i, (a, e) in enumerate(zip(actual, expected)):
            walk(a, e, f"{where}[{i}]", diffs, problems)
    else:
        a, e = _number(actual), _number(expected)
        if a is not None and e is not None:
            if math.isnan(a) or math.isnan(e):
                if not (math.isnan(a) and math.isnan(e)):
                    problems.append(f"{where}: {actual} != {expected}")
            else:
                diffs.append((abs(a - e), where))
        elif actual != expected:
            problems.append(f"{where}: {actual!r} != {expected!r}")


def load(path: Path):
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    return json.loads(path.read_text())


def compare(after: Path, expected: Path) -> None:
    for name in OUTPUTS:
        if not (after / name).exists():
            print(f"{name}: MISSING in {after}")
            continue
        diffs, problems = [], []
        walk(load(after / name), load(expected / name), name, diffs, problems)
        worst = max(diffs, default=(0.0, "-"))
        verdict = "OK" if worst[0] <= 1e-5 and not problems else "DIFFERS"
        print(f"{name}: max abs diff {worst[0]:.3g} at {worst[1]} ({len(diffs)} numbers); "
              f"{len(problems)} non-numeric mismatches  {verdict}")
        for problem in problems[:10]:
            print("   ", problem)


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        run(record=True)
    else:
        compare(run(record=False), HERE / "expected")
