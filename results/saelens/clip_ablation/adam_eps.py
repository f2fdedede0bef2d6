# does Adam's eps matter? our loss is SAELens' / d_in, so its eps acts 576x larger (scratch)
import os, importlib.util, json, sys, functools, torch
from pathlib import Path
spec = importlib.util.spec_from_file_location("compare_saelens", str(Path(__file__).resolve().parents[3] / "benchmarks" / "compare_saelens.py"))
compare = importlib.util.module_from_spec(spec); spec.loader.exec_module(compare)
name, eps = sys.argv[1], float(sys.argv[2])
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
torch.set_num_threads(1)
_Adam = torch.optim.Adam
class AdamEps(_Adam):
    def __init__(self, params, **kw):
        super().__init__(params, **{**kw, "eps": eps})
torch.optim.Adam = AdamEps
S = os.environ.get("STORES", "/work/s15/stores")  # benchmarks/saelens_stores.py --out S
out = Path(os.environ.get("OUT", "/work/s16/abl")) / name / "ours"
out.parent.mkdir(parents=True, exist_ok=True)
job = {"store": f"{S}/train", "heldout": f"{S}/heldout", "eval_tokens": 16_384, "steps": int(options.pop("steps", 146)), "batch_size": 2048,
       "lr": 3e-3, "seed": 0, "expansion": 4, "threads": 1, "spec": {"architecture": "standard", "l1_coefficient": options.pop("l1", 0.002)},
       "out": str(out.parent), "ours_options": options}
rec = compare.ours_worker(job)
from sae.io import load_dictionary
d = load_dictionary(rec["folder"])
rec.update(compare.measure(d.encode, d.decode, compare.heldout_rows(job["heldout"], 16384)))
print(name, json.dumps({k: rec[k] for k in ("l0", "fvu", "dead_fraction", "folder", "cpu_s")}), flush=True)
