"""Rerun the real-model trace commands with the new code but the OLD pass-through factor (2x), to show
that the trace differences come from the rule change alone."""
import sys
import circuits.engine.positions as positions

positions.MASSIVE_FACTOR = 2.0
from sparse_circuits.cli.main import main

common = ["--threads", "2", "trace", "--device", "cpu", "--saes", "/work/regression_real/sae", "--feature",
          "blocks.10.hook_resid_post:1945", "--depth", "1", "--top-k", "5", "--contexts",
          "/work/regression_real/contexts.txt", "--scan-contexts", "20", "--context-size", "32", "--seed", "0"]
for method, extra in (("attribution", []), ("ablation", ["--max-candidates", "20"])):
    code = main([*common, "--method", method, *extra, "--out", f"/work/regression_real/after_2x/trace_{method}.json"])
    print(method, "exit", code, flush=True)
