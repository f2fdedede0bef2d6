# spliced CE/KL (+ FVU, L0 on those tokens) for dictionary folders; same contexts as compare_saelens --ce-contexts 32
from pathlib import Path
import os, json, sys, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from compare_saelens import HOOK
from circuits.evaluation import evaluate_dictionaries
from circuits.models import load_model
from sae.corpus import load_corpus, tokenize_contexts
from sae.io import load_dictionary
torch.set_num_threads(2)
out_path, folders = sys.argv[1], sys.argv[2:]
model = load_model("smollm2-135m", device="cpu")
contexts = tokenize_contexts(load_corpus("registry"), model.tokenizer, 128, 32, split="eval", seed=0)
dicts = [load_dictionary(f) for f in folders]
for d in dicts: d.cfg.hook_name = d.cfg.hook_name or HOOK
out = []
for f, r in zip(folders, evaluate_dictionaries(model, dicts, contexts, progress=False)):
    out.append({"folder": f, "l0": r.get("l0"), "fvu": r.get("fvu"), "ce_increase": r["ce_loss_spliced"] - r["ce_loss_clean"], "kl": r["kl"]})
    print(json.dumps(out[-1]), flush=True)
json.dump(out, open(out_path, "w"), indent=1)
