"""Our SAE training against SAELens' on the same activations, batches and steps (issue 14). Not run in CI.

Both libraries train on one activation store (sae.activation_store, harvested by `sparse-circuits train` or
circuits.harvest) and read IDENTICAL batches: each reads the store with the same seed and keeps the same
typical rows (sae.metrics.typical_token_mask, which our loop applies itself). SAELens (6.54; it cannot be
installed beside transformer-lens 4) runs in its own virtual environment as a subprocess of this script,
with this repository on its PYTHONPATH (the `sae` package imports without `circuits` or transformer-lens):

    python -m venv /work/saelens_env && /work/saelens_env/bin/pip install sae-lens==6.54.12

SAELens side: its TrainingSAE classes (StandardTrainingSAE, TopKTrainingSAE) with their default recipe
(decoder init norm 0.1, norm-weighted L1, TopK rescale_acts_by_decoder_norm, gradient clipping at 1.0,
constant learning rate, no L1 warm-up) and normalize_activations='expected_average_only_in' (the scale is
estimated on batch 0, as ours is), stepped by SAETrainer.step on the same batches for the same number of
steps (fit() counts samples, and our batches lose their few massive rows, so it would take extra steps).
Its L1 coefficient multiplies a loss summed over d_in where ours is averaged, so SAELens' coefficient for
ours `a` is `a * d_in` (the same penalty).

Each dictionary trains in its own worker process (`--worker`), one at a time, on `--threads` torch threads
in both libraries; tokens per CPU-second = training tokens / time.process_time() of that worker over the
training call only (process_time sums the CPU time of all the process's threads; reading the store is
inside the call for both libraries, building the SAE and evaluating are outside).

Evaluation: both libraries' saved folders are loaded by sae.io.load_dictionary (SAELens folders load here)
and measured on the same held-out tokens (the typical rows of the first --eval-tokens of --heldout): L0,
FVU, dead fraction (never fired on them). The SAELens worker also measures its SAE with SAELens' own
encode/decode (`saelens_fvu_own`), which checks the loading. For ReLU+L1, each library's sweep over L1
gives an L0-FVU curve and `fvu_at_l0` interpolates (linearly in log L0) the other library's FVU at each L0.

    python benchmarks/compare_saelens.py --store STORE --heldout HELDOUT --steps 146 490 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "blocks.12.hook_resid_post"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAELENS_PYTHON = "/work/saelens_env/bin/python"


# ---------------------------------------------------------------------------------------------
# pure helpers (tested in tests/test_compare_saelens.py)


def fvu_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """FVU at `l0` from a sweep's (L0, FVU) points, linear in log L0 between the two points around it;
    None when `l0` is outside the sweep's range (no extrapolation)."""
    ordered = sorted((float(a), float(b)) for a, b in points if a > 0)
    for (l0_low, fvu_low), (l0_high, fvu_high) in zip(ordered, ordered[1:]):
        if l0_low <= l0 <= l0_high:
            if l0_high == l0_low:
                return (fvu_low + fvu_high) / 2
            weight = (math.log(l0) - math.log(l0_low)) / (math.log(l0_high) - math.log(l0_low))
            return fvu_low + weight * (fvu_high - fvu_low)
    if len(ordered) == 1 and ordered[0][0] == l0:
        return ordered[0][1]
    return None


def matched_rows(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """For each of our ReLU points, SAELens' FVU interpolated at our L0, and the ratio (ours / theirs); the same
    for the spliced CE increase where every point has one."""
    rows = []
    for row in sorted(ours, key=lambda r: r["l0"]):
        other = fvu_at_l0([(record["l0"], record["fvu"]) for record in theirs], row["l0"])
        rows.append({"l1_coefficient": row["l1_coefficient"], "l0": row["l0"], "ours_fvu": row["fvu"],
                     "saelens_fvu_at_l0": other, "ratio": None if other is None else row["fvu"] / other})
        if "ce_increase" in row and all("ce_increase" in record for record in theirs):
            other = fvu_at_l0([(record["l0"], record["ce_increase"]) for record in theirs], row["l0"])
            rows[-1].update({"ours_ce": row["ce_increase"], "saelens_ce_at_l0": other,
                             "ce_ratio": None if other is None else row["ce_increase"] / other})
    return rows


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> {key: JSON value (or the string itself when it is not JSON)}."""
    result = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


# ---------------------------------------------------------------------------------------------
# workers (run in a subprocess; only `sae` and torch imported)


def typical_batches(store_path: str, batch_size: int, seed: int):
    """The batches both libraries train on: the store's seeded batches, massive rows left out."""
    from sae.activation_store import ActivationStore
    from sae.metrics import typical_token_mask

    for batch in ActivationStore(store_path).batches([HOOK], batch_size, seed):
        x = batch[HOOK]
        yield x[typical_token_mask(x)]


def heldout_rows(path: str, n_tokens: int):
    import torch
    from sae.metrics import typical_token_mask
    from safetensors import safe_open

    folder, parts = Path(path), []
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        with safe_open(str(folder / shard["file"]), framework="pt") as handle:
            parts.append(handle.get_tensor(HOOK).float())
        if sum(part.shape[0] for part in parts) >= n_tokens:
            break
    x = torch.cat(parts)[:n_tokens]
    return x[typical_token_mask(x)]


def measure(encode, decode, x) -> dict:
    """L0, FVU, dead fraction of an encode/decode pair on x [tokens, d_in] (sae.metrics definitions)."""
    import torch
    from sae.metrics import fraction_unexplained

    with torch.no_grad():
        codes = torch.cat([encode(part) for part in x.split(4096)])
        reconstruction = torch.cat([decode(part) for part in codes.split(4096)])
    fired = (codes != 0)
    return {"l0": fired.sum(dim=1).double().mean().item(), "fvu": fraction_unexplained(x - reconstruction, x).item(),
            "dead_fraction": (~fired.any(dim=0)).double().mean().item()}


def ours_worker(job: dict) -> dict:
    import torch
    from sae.config import DictionaryConfig
    from sae.activation_store import ActivationStore
    from sae.training import TrainingConfig, train_dictionaries

    store = ActivationStore(job["store"])
    d_in = store.d_in(HOOK)
    spec = job["spec"]
    cfg = DictionaryConfig(spec["architecture"], d_in=d_in, d_sae=job["expansion"] * d_in, hook_name=HOOK,
                           l1_coefficient=spec.get("l1_coefficient", 0.0), k=spec.get("k"), tied=spec.get("tied", False),
                           apply_b_dec_to_input=spec.get("apply_b_dec_to_input", True), seed=job["seed"])
    steps, batch_size = job["steps"], job["batch_size"]
    settings = {"lr_warmup_steps": min(100, max(1, round(0.05 * steps))),  # what `sparse-circuits train` sets
                "dead_window_tokens": min(10_000_000, store.n_tokens), **job.get("ours_options", {})}
    if "adam_betas" in settings:
        settings["adam_betas"] = tuple(settings["adam_betas"])
    training = TrainingConfig(total_tokens=steps * batch_size, batch_size=batch_size, lr=job["lr"], seed=job["seed"],
                              checkpoint_every=None, log_every=10**9, **settings)
    start = time.process_time(), time.perf_counter()
    [result] = train_dictionaries(store, [cfg], training, job["out"], names=["ours"], progress=False)
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    return {"folder": str(result.folder), "cpu_s": cpu, "wall_s": wall, "tokens": steps * batch_size,
            "training": {key: (list(value) if isinstance(value, tuple) else value)
                         for key, value in vars(training).items()}}


def saelens_worker(job: dict) -> dict:
    import itertools

    import torch
    from sae_lens import __version__
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sae.activation_store import ActivationStore

    d_in = ActivationStore(job["store"]).d_in(HOOK)
    spec, steps, batch_size = job["spec"], job["steps"], job["batch_size"]
    start = time.process_time(), time.perf_counter()  # as ours: building the SAE and reading the store count
    torch.manual_seed(job["seed"])
    common = {"d_in": d_in, "d_sae": job["expansion"] * d_in, "normalize_activations": "expected_average_only_in",
              **job.get("saelens_options", {})}
    if spec["architecture"] == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=spec["k"], **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=spec["l1_coefficient"] * d_in, **common))
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                                   lr=job["lr"], n_batches_for_norm_estimate=1,
                                   **{"lr_end": job["lr"] / 10, **job.get("saelens_trainer", {})})  # runner's default
    batches = typical_batches(job["store"], batch_size, job["seed"])
    first = next(batches)
    trainer = SAETrainer(trainer_cfg, sae, itertools.chain([first], [first], batches))
    trainer.activation_scaler.estimate_scaling_factor(d_in=d_in, data_provider=trainer.data_provider,
                                                      n_batches_for_norm_estimate=1)  # on batch 0, as ours
    for _ in range(steps):
        trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
    sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    folder = Path(job["out"]) / "saelens"
    sae.save_inference_model(folder)
    x = heldout_rows(job["heldout"], job["eval_tokens"])
    own = measure(sae.encode, sae.decode, x)
    return {"folder": str(folder), "cpu_s": cpu, "wall_s": wall, "tokens": steps * batch_size,
            "saelens_version": __version__, "saelens_fvu_own": own["fvu"], "saelens_l0_own": own["l0"]}


def run_worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    result = (saelens_worker if job["library"] == "saelens" else ours_worker)(job)
    result["threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the driver


def train_one(library: str, job: dict, python: str, reuse: bool = False) -> dict:
    """Train one dictionary in a fresh worker process; returns the worker's record plus held-out metrics.

    The record is also written to `job["out"]/record.json`; with `reuse`, a record there made by the same job
    is returned without training again (a rerun of an interrupted sweep)."""
    from sae.io import load_dictionary

    saved = Path(job["out"]) / "record.json"
    if reuse and saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("job") == {**job, "library": library}:
            return previous["record"]
    with tempfile.TemporaryDirectory() as scratch:
        job = {**job, "library": library, "result": f"{scratch}/result.json"}
        Path(f"{scratch}/job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
        subprocess.run([python, str(Path(__file__).resolve()), "--worker", f"{scratch}/job.json"], env=env, check=True)
        record = json.loads(Path(job["result"]).read_text())
    dictionary = load_dictionary(record["folder"])
    record.update(measure(dictionary.encode, dictionary.decode, heldout_rows(job["heldout"], job["eval_tokens"])))
    record["tokens_per_cpu_s"] = record["tokens"] / record["cpu_s"]
    saved.write_text(json.dumps({"job": {key: value for key, value in job.items() if key != "result"}, "record": record}))
    return record


def sae_specs(args, library: str) -> list[dict]:
    """What `library` trains: every --k, and its L1 sweep (--l1; SAELens' --saelens-l1 when given)."""
    l1 = args.saelens_l1 if library == "saelens" and args.saelens_l1 is not None else args.l1
    return [{"architecture": "topk", "k": k} for k in args.k] + [{"architecture": "standard", "l1_coefficient": a}
                                                                  for a in l1]


def run_budget(args, steps: int, store: str) -> dict:
    """Train every (library, spec) of one budget, `args.jobs` worker processes at a time (each measures its own
    CPU time, so running several side by side changes only the wall time)."""
    from concurrent.futures import ThreadPoolExecutor

    from sae.activation_store import ActivationStore

    tasks = []
    for library in args.libraries:
        for spec in sae_specs(args, library):
            out = Path(args.out) / f"steps_{steps}" / "_".join(f"{key}_{value}" for key, value in spec.items()) / library
            out.mkdir(parents=True, exist_ok=True)
            job = {"store": store, "heldout": args.heldout, "eval_tokens": args.eval_tokens, "steps": steps,
                   "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "expansion": args.expansion,
                   "threads": args.threads, "spec": spec, "ours_options": parse_overrides(args.ours_option),
                   "saelens_options": parse_overrides(args.saelens_option),
                   "saelens_trainer": parse_overrides(args.saelens_trainer_option), "out": str(out)}
            tasks.append((library, spec, job))

    def run(task):
        library, spec, job = task
        record = train_one(library, job, sys.executable if library == "ours" else args.saelens_python, args.reuse)
        print_row(steps, spec, library, record)
        return record

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(run, tasks))
    rows: list[dict] = []
    for (library, spec, _), record in zip(tasks, records):
        row = next((row for row in rows if row["spec"] == spec), None)
        if row is None:
            rows.append(row := {"spec": spec})
        row[library] = record
    return {"steps": steps, "tokens": steps * args.batch_size, "store": store,
            "store_tokens": ActivationStore(store).n_tokens, "rows": rows, "matched_l0": matched(rows)}


def ce_candidates(rows: list[dict]) -> list[dict]:
    """The records of a spliced evaluation: every dictionary, so that CE too is interpolated at matched L0."""
    return [row[library] for row in rows for library in ("ours", "saelens") if library in row]


def spliced_ce(budgets: list[dict], n_contexts: int, threads: int) -> None:
    """CE increase when spliced (circuits.evaluation, BOS and massive activations passed through) of every trained
    dictionary picked by `ce_candidates`, ours and SAELens' alike, on the first `n_contexts` held-out contexts (the
    eval split, seed 0, as the held-out store); adds `ce_increase` and `kl` to those records. Needs this
    repository's main environment (transformer-lens 4)."""
    import torch
    from circuits.evaluation import evaluate_dictionaries
    from circuits.models import load_model
    from sae.corpus import load_corpus, tokenize_contexts
    from sae.io import load_dictionary

    torch.set_num_threads(threads)
    model = load_model("smollm2-135m", device="cpu")
    contexts = tokenize_contexts(load_corpus("registry"), model.tokenizer, 128, n_contexts, split="eval", seed=0)
    records = [record for budget in budgets for record in ce_candidates(budget["rows"])]
    dictionaries = [load_dictionary(record["folder"]) for record in records]
    for dictionary in dictionaries:  # SAELens' trainer, fed our batches, never knew the hook: its cfg leaves it empty
        dictionary.cfg.hook_name = dictionary.cfg.hook_name or HOOK
    results = evaluate_dictionaries(model, dictionaries, contexts, progress=False)
    for record, result in zip(records, results):
        record.update({"ce_increase": result["ce_loss_spliced"] - result["ce_loss_clean"], "kl": result["kl"],
                       "ce_tokens": n_contexts * 127})


def matched(rows: list[dict]) -> list[dict]:
    """Our ReLU points against SAELens' sweep (see matched_rows)."""
    relu = [row for row in rows if row["spec"]["architecture"] == "standard"]

    def points(library: str) -> list[dict]:
        return [{**row[library], "l1_coefficient": row["spec"]["l1_coefficient"]} for row in relu if library in row]

    return matched_rows(points("ours"), points("saelens")) if points("ours") and points("saelens") else []


def print_row(steps: int, spec: dict, library: str, record: dict) -> None:
    name = f"topk k={spec['k']}" if spec["architecture"] == "topk" else f"relu l1={spec['l1_coefficient']:g}"
    print(f"steps {steps:4d}  {name:16s} {library:8s} L0 {record['l0']:7.1f}  FVU {record['fvu']:.4f}  "
          f"dead {record['dead_fraction']:.3f}  tokens/CPU-s {record['tokens_per_cpu_s']:8.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--store", nargs="+", help="activation store (train split) holding " + HOOK +
                        "; one for every budget, or one per --steps value")
    parser.add_argument("--heldout", help="activation store folder of held-out tokens")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--steps", type=int, nargs="+", default=[146])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, nargs="*", default=[60])
    parser.add_argument("--l1", type=float, nargs="*", default=[], help="our L1 coefficients (SAELens: x d_in)")
    parser.add_argument("--saelens-l1", type=float, nargs="*", help="SAELens' sweep, in our units (default: --l1)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--libraries", nargs="+", default=["ours", "saelens"], choices=["ours", "saelens"])
    parser.add_argument("--ours-option", action="append", default=[], help="TrainingConfig field=value")
    parser.add_argument("--saelens-option", action="append", default=[], help="SAELens training SAE cfg field=value")
    parser.add_argument("--saelens-trainer-option", action="append", default=[], help="SAETrainerConfig field=value")
    parser.add_argument("--saelens-python", default=DEFAULT_SAELENS_PYTHON)
    parser.add_argument("--out", default="compare_saelens_runs", help="folder for the trained dictionaries")
    parser.add_argument("--ce-contexts", type=int, default=0,
                        help="also measure the CE increase when spliced on this many held-out contexts of 128")
    parser.add_argument("--ce-threads", type=int, help="torch threads of the spliced evaluation (default: --threads)")
    parser.add_argument("--reuse", action="store_true", help="keep the records of dictionaries an earlier run of "
                        "the same jobs trained (OUT/.../record.json): a rerun after an interruption")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    if not args.store or not args.heldout:
        parser.error("--store and --heldout are required")
    started = time.perf_counter()
    if len(args.store) not in (1, len(args.steps)):
        parser.error("give one --store, or one per --steps value")
    stores = args.store * len(args.steps) if len(args.store) == 1 else args.store
    budgets = [run_budget(args, steps, store) for steps, store in zip(args.steps, stores)]
    if args.ce_contexts:
        spliced_ce(budgets, args.ce_contexts, args.ce_threads or args.threads)
        for budget in budgets:
            budget["matched_l0"] = matched(budget["rows"])
    report = {"command": " ".join(["python", "benchmarks/compare_saelens.py", *sys.argv[1:]]), "hook": HOOK,
              "threads": args.threads, "budgets": budgets, "wall_s": time.perf_counter() - started}
    for budget in budgets:
        for row in budget["matched_l0"]:
            print(f"steps {budget['steps']}: relu L0 {row['l0']:.1f}: ours FVU {row['ours_fvu']:.4f}, SAELens at that "
                  f"L0 {row['saelens_fvu_at_l0']}, ratio {row['ratio']}; CE ratio {row.get('ce_ratio')}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
