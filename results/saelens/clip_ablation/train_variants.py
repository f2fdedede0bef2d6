"""Recipe ablation for ReLU+L1 (and TopK) at 146 / 490 steps, measured for CE as well as FVU (issue 14).

Run on 2026-12-03, when the default recipe had no gradient clip: every variant without a grad_clip_norm of its own
is that recipe ("current") with one change; they now say grad_clip_norm None explicitly, so a rerun trains the same.
    STORES=S OUT=DIR python results/saelens/clip_ablation/train_variants.py [VARIANT ...]
then spliced_ce.py OUT.json DIR/<variant>/ours ... for the CE increase. See ../ablation_clip.md.
"""
import os, importlib.util, json, sys, torch
from pathlib import Path
spec = importlib.util.spec_from_file_location("compare_saelens", str(Path(__file__).resolve().parents[3] / "benchmarks" / "compare_saelens.py"))
compare = importlib.util.module_from_spec(spec); spec.loader.exec_module(compare)
S = os.environ.get("STORES", "/work/s15/stores")  # benchmarks/saelens_stores.py --out S
VARIANTS = {
    "current": {"grad_clip_norm": None},
    "b_dec_zero": {"grad_clip_norm": None, "b_dec_init": "zero"},
    "no_warmups": {"grad_clip_norm": None, "lr_warmup_steps": 0, "l1_warmup_steps": 0},
    "no_lr_decay": {"grad_clip_norm": None, "lr_decay_fraction": 0.0},
    "no_l1_warmup": {"grad_clip_norm": None, "l1_warmup_steps": 0},
    "no_lr_warmup": {"grad_clip_norm": None, "lr_warmup_steps": 0},
    "clip_1": {"grad_clip_norm": 1.0},
    "clip_equiv": {"grad_clip_norm": 1 / 576},
    "clip_equiv_nowarm": {"grad_clip_norm": 1 / 576, "lr_warmup_steps": 0, "l1_warmup_steps": 0},
    "relu490_current": {"grad_clip_norm": None, "steps": 490},
    "relu490_clip_equiv": {"steps": 490, "grad_clip_norm": 1 / 576},
    "topk146_current": {"grad_clip_norm": None, "arch": "topk"},
    "topk146_clip_equiv": {"arch": "topk", "grad_clip_norm": 1 / 576},
    "topk490_clip_equiv": {"arch": "topk", "steps": 490, "grad_clip_norm": 1 / 576},
    "saelens_all_equiv": {"b_dec_init": "zero", "lr_warmup_steps": 0, "l1_warmup_steps": 0, "lr_decay_fraction": 0.0, "grad_clip_norm": 1 / 576},
    "saelens_all": {"b_dec_init": "zero", "lr_warmup_steps": 0, "l1_warmup_steps": 0, "lr_decay_fraction": 0.0, "grad_clip_norm": 1.0},
}
names = sys.argv[1:] or list(VARIANTS)
base = {"store": f"{S}/train", "heldout": f"{S}/heldout", "eval_tokens": 16_384, "steps": 146, "batch_size": 2048,
        "lr": 3e-3, "seed": 0, "expansion": 4, "threads": 1}
out = {}
for name in names:
    folder = Path(os.environ.get("OUT", "/work/s16/abl")) / name; folder.mkdir(parents=True, exist_ok=True)
    options = dict(VARIANTS[name]); steps = options.pop("steps", 146); arch = options.pop("arch", "standard")
    spec = {"architecture": "topk", "k": 60} if arch == "topk" else {"architecture": "standard", "l1_coefficient": 0.002}
    rec = compare.train_one("ours", {**base, "steps": steps, "spec": spec,
                                     "out": str(folder), "ours_options": options}, sys.executable, reuse=True)
    out[name] = {k: rec[k] for k in ("l0", "fvu", "dead_fraction", "folder")}
    print(name, out[name], flush=True)
Path(os.environ.get("OUT", "/work/s16/abl")) / f"train_{names[0]}.json".write_text(json.dumps(out, indent=1))
