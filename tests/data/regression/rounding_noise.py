"""Rounding noise of the IOI summary on the tiny regression models: the same (current) code, 1 vs 2 torch threads.

    python tests/data/regression/rounding_noise.py

Prints, per model, the summary columns under each thread count and their relative difference. It is the evidence
for LOOSE in tests/test_regression.py: whatever moves with the thread count alone is float32 rounding.
"""

import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TESTS))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import test_regression as regression  # noqa: E402
from conftest import save_tiny_model  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for model in regression.MODELS:
            folder = save_tiny_model(tmp / f"tiny_{model}", model)
            saes = tmp / f"saes_{model}"
            shutil.copytree(regression.DATA / "saes" / model, saes)
            argv = next(c for c in regression.commands(folder, saes, tmp / "unused", model) if c[0] == "ioi")
            summaries = {}
            for threads in (1, 2):
                out = tmp / f"{model}_{threads}"
                argv[argv.index("--out") + 1] = str(out)
                torch.set_num_threads(threads)
                regression.cli_main()(argv)
                summaries[threads] = pd.read_csv(out / "summary.csv")
            for column in ("area_under_curve", "best_kl", "kl_unpatched"):
                one, two = summaries[1][column].to_numpy(), summaries[2][column].to_numpy()
                print(f"{model} {column}: 1 thread {one}, 2 threads {two}, relative difference "
                      f"{abs(one - two) / abs(one)}")


if __name__ == "__main__":
    main()
