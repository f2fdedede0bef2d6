"""Data parallelism under torchrun (gloo on CPU): 2 processes give the weights of 1 process with the same
global batch and seed, a harvest by 2 processes is the store 1 process writes, kill -9 of one rank then
the same command resumes and finishes, and mistakes (a resume at another world size, a batch that does
not divide) are one clear error. Real processes started by torch.distributed.run, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.distributed import Distributed, share_rows

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    environment.update(extra)
    return environment


def _torchrun(n: int, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *arguments]


def _run(command: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=_environment(**extra), cwd=ROOT)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {sub.name: load_file(str(sub / "sae_weights.safetensors"))
            for sub in sorted(folder.iterdir()) if (sub / "sae_weights.safetensors").exists()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[name][key].double() - b[name][key].double()).abs().max()) for name in a for key in a[name])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The worker's run in 1 process and in 2 (every architecture, outliers, AuxK and resampling active)."""
    root = tmp_path_factory.mktemp("ddp")
    single = _run([sys.executable, str(WORKER), str(root / "one")])
    assert single.returncode == 0, single.stderr
    double = _run(_torchrun(2, str(WORKER), str(root / "two")))
    assert double.returncode == 0, double.stderr
    return root


def test_two_processes_give_the_weights_of_one(two_runs):
    one, two = _weights(two_runs / "one"), _weights(two_runs / "two")
    assert len(one) == 5
    difference = _max_difference(one, two)
    print(f"max |weight difference|, 2 processes vs 1: {difference:.3g}")
    assert difference < 1e-5  # equal up to the order of the all-reduce's float sums
    scale_one = (two_runs / "one").joinpath(next(iter(one)), "cfg.json").read_text()
    assert '"activation_scale"' in scale_one


def test_a_killed_rank_then_the_same_command_resumes_and_finishes(two_runs, tmp_path):
    out = tmp_path / "killed"
    command = _torchrun(2, str(WORKER), str(out))
    process = subprocess.Popen(command, env=_environment(DISTRIBUTED_WORKER_DELAY="0.05", DISTRIBUTED_WORKER_PIDS=str(tmp_path)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*/state.json")) and time.time() < deadline:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.1)
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports the failed rank and stops the other
    assert not (out / "blocks.0.hook_resid_post__k_4" / "sae_weights.safetensors").exists()
    resumed = _run(command)
    assert resumed.returncode == 0, resumed.stderr
    assert _max_difference(_weights(out), _weights(two_runs / "two")) == 0.0  # resumed exactly


def test_resuming_at_another_world_size_is_one_clear_error(tmp_path):
    out = tmp_path / "stopped"
    stopped = _run(_torchrun(2, str(WORKER), str(out), "20"))
    assert stopped.returncode == 0, stopped.stderr
    single = _run([sys.executable, str(WORKER), str(out)])
    assert single.returncode != 0
    assert "written by a run of 2 process(es) and this run has 1" in single.stderr
    assert "--nproc_per_node=2" in single.stderr


def test_cli_harvest_and_train_in_two_processes_match_one(tiny_llama_folder, text_corpus, tmp_path):
    """`torchrun ... sparse-circuits train` on a tiny model: the 2-process store holds the 1-process store's
    activations shard for shard, and the dictionaries agree."""
    common = ["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
              "blocks.1.hook_resid_post", "--tokens", "20000", "--context-size", "32", "--batch-size", "256",
              "--arch", "topk", "--k", "4", "--store-dtype", "float32", "--checkpoint-every", "5"]
    one = _run([sys.executable, "-m", "sparse_circuits", *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _run(_torchrun(2, "-m", "sparse_circuits", *common, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("L0 4.0") == 1  # rank 0 alone reports
    shards = sorted((tmp_path / "one" / "activations").glob("shard_*.safetensors"))
    assert len(shards) >= 2  # more than one shard, so both ranks harvested
    for shard in shards:
        a, b = load_file(str(shard)), load_file(str(tmp_path / "two" / "activations" / shard.name))
        assert torch.equal(a["blocks.1.hook_resid_post"], b["blocks.1.hook_resid_post"])
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5


def test_a_batch_that_does_not_divide_is_one_clear_error(tiny_llama_folder, text_corpus, tmp_path):
    done = _run([sys.executable, "-m", "sparse_circuits", "train", "--model", str(tiny_llama_folder), "--corpus",
                 str(text_corpus), "--hook", "blocks.1.hook_resid_post", "--batch-size", "100", "--out",
                 str(tmp_path / "o")], WORLD_SIZE="3")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --batch-size 100 does not divide among the 3 processes torchrun started; give a multiple of 3"]
    with pytest.raises(ValueError, match="does not divide among 3 processes"):
        share_rows(100, (0, 3))


def test_a_world_of_one_needs_no_process_group():
    world = Distributed.from_environment("cpu") if "WORLD_SIZE" not in os.environ else Distributed()
    x = torch.arange(6.0).reshape(3, 2)
    assert not world.active and world.gather_rows(x) is x and world.total(7) == 7
    assert share_rows(8, (1, 2)) == slice(4, 8)
