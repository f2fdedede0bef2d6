# gradient norm per step (before clipping) of our ReLU+L1 / TopK at 146 steps, clip on ("auto") or off (None)
import os, importlib.util, json, sys, torch
from pathlib import Path
spec = importlib.util.spec_from_file_location("compare_saelens", str(Path(__file__).resolve().parents[3] / "benchmarks" / "compare_saelens.py"))
compare = importlib.util.module_from_spec(spec); spec.loader.exec_module(compare)
arch, clip = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
norms = []
original = torch.nn.utils.clip_grad_norm_
def recording(parameters, max_norm, *a, **k):
    total = original(parameters, max_norm, *a, **k); norms.append(float(total)); return total
torch.nn.utils.clip_grad_norm_ = recording
if clip is None:  # record without clipping: an infinite clip measures the norm and scales nothing
    clip = 1e30
S = os.environ.get("STORES", "/work/s15/stores")  # benchmarks/saelens_stores.py --out S
out = Path(os.environ.get("OUT", "/work/s16/gradnorm")) / (f"{arch}_{sys.argv[2]}"); out.mkdir(parents=True, exist_ok=True)
spec_ = {"architecture": "topk", "k": 60} if arch == "topk" else {"architecture": "standard", "l1_coefficient": 0.002}
job = {"store": f"{S}/train", "heldout": f"{S}/heldout", "eval_tokens": 16_384, "steps": 146, "batch_size": 2048,
       "lr": 3e-3, "seed": 0, "expansion": 4, "threads": 1, "spec": spec_, "out": str(out),
       "ours_options": {"grad_clip_norm": clip}}
compare.ours_worker(job)
q = lambda a, b: sum(norms[a:b]) / len(norms[a:b])
print(arch, sys.argv[2], "steps", len(norms), "mean grad norm (x d_in = SAELens units): 0-4 %.3g, 5-19 %.3g, 20-59 %.3g, 60-145 %.3g" % tuple(576 * q(a, b) for a, b in ((0, 5), (5, 20), (20, 60), (60, 146))))
Path(out / "norms.json").write_text(json.dumps(norms))
