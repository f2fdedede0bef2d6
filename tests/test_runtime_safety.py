"""Runtime safety (issue 15): one writer per output folder, stale temporaries removed on resume, reuse only
when the recorded settings match, dictionary folders written atomically as a whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sae.io
from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.io import load_dictionary, read_tensor_file, save_dictionary
from sae.locking import LOCK_FILE, FolderInUseError, folder_lock
from sae.training import TrainingConfig, train_dictionaries

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"


# --- the lock --------------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_writer_is_refused_naming_the_owner(tmp_path):
    import fcntl

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                  "started": "2026-01-01 00:00:00 UTC", "command": "train"}))
    holder = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: as another process would hold it
    try:
        with pytest.raises(FolderInUseError, match=rf"{tmp_path} is in use by process {os.getpid()} \(started "
                                                   r"2026-01-01 00:00:00 UTC: train\); wait for it or pick another --out"):
            with folder_lock(tmp_path):
                pass
    finally:
        os.close(holder)
    assert isinstance(FolderInUseError("x"), OSError)  # the CLI reports OSError as one error line, exit 2


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                                  "started": "2026-01-01 00:00:00 UTC", "command": "train"}))
    with folder_lock(tmp_path):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with folder_lock(tmp_path):  # re-entrant within a process
            pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_note_names_the_dead_owner(tmp_path, capsys):
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "then",
                                                  "command": "train"}))
    with folder_lock(tmp_path):
        pass
    err = capsys.readouterr().err
    assert f"note: {tmp_path} was locked by process {pid} (started then: train), which is no longer running" in err


def test_a_folder_created_for_the_lock_is_removed_if_left_empty(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "out"):
            raise RuntimeError("the command failed before writing anything")
    assert not (tmp_path / "out").exists()


# --- stale temporaries, atomic dictionary folders -----------------------------------------------------


def test_stale_temporaries_of_a_killed_run_are_removed_on_resume(tmp_path):
    (tmp_path / "checkpoints" / ".step_00000010.x1.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step_00000010.x1.tmp" / "a.safetensors").write_bytes(b"half")
    (tmp_path / f".{HOOK}.x2.tmp").mkdir()
    (tmp_path / f".{HOOK}.x2.tmp" / "sae_weights.safetensors").write_bytes(b"half")
    config = DictionaryConfig("standard", 8, 16, hook_name=HOOK, l1_coefficient=1e-3)
    training = TrainingConfig(total_tokens=640, batch_size=64, checkpoint_every=5)
    train_dictionaries(TensorBatchSource({HOOK: torch.randn(640, 8)}), [config], training, tmp_path, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == [HOOK, "checkpoints"]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_a_dictionary_folder_is_written_as_a_whole(tmp_path, monkeypatch, random_sae):
    folder = save_dictionary(random_sae(seed=0), tmp_path / HOOK, extra_files={"training_log.csv": "step\n1\n"})
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_write = sae.io.atomic_write_text

    def killed_before_cfg(path, text):
        if path.name == "cfg.json":
            raise KeyboardInterrupt  # a kill between the weights and cfg.json
        real_write(path, text)

    monkeypatch.setattr(sae.io, "atomic_write_text", killed_before_cfg)
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(random_sae(seed=1), folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # the old folder, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == [HOOK]  # no temporary left
    monkeypatch.undo()
    save_dictionary(random_sae(seed=1), folder)  # replacing a folder drops its stale files
    assert sorted(path.name for path in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert torch.equal(load_dictionary(folder).W_dec, random_sae(seed=1).W_dec)


# --- two `train` commands on one --out, as subprocesses on the tiny model ----------------------------------


def _train_argv(model, corpus, out, tokens=3000) -> list[str]:
    return [sys.executable, "-m", "sparse_circuits", "--threads", "1", "train", "--model", str(model), "--corpus",
            str(corpus), "--hook", HOOK, "--tokens", str(tokens), "--context-size", "16", "--batch-size", "128",
            "--epochs", "4", "--lr", "3e-3", "--out", str(out), "--checkpoint-every", "20"]


def _wait_for_lock(folder: Path, pid: int, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if json.loads((folder / LOCK_FILE).read_text()).get("pid") == pid:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{folder} was never locked by {pid}")


@pytest.fixture(scope="module")
def concurrent_runs(tiny_llama_folder, text_corpus, tmp_path_factory):
    """Run 1 takes the lock and is paused (SIGSTOP); run 2 on the same --out must be refused; run 1 then
    finishes; a lone run 3 on another --out is the reference."""
    shared, lone = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("lone")
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(_train_argv(tiny_llama_folder, text_corpus, shared), cwd=REPO, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(_train_argv(tiny_llama_folder, text_corpus, lone), cwd=REPO, env=environment,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(shared, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock mid-run while the second starts
        try:
            second = subprocess.run(_train_argv(tiny_llama_folder, text_corpus, shared), cwd=REPO, env=environment,
                                    capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first_out = first.communicate(timeout=600)
        reference_out = reference.communicate(timeout=600)
    finally:
        for process in (first, reference):
            if process.poll() is None:
                process.kill()
    return {"shared": shared, "lone": lone, "first": (first.returncode, *first_out), "second": second,
            "reference": (reference.returncode, *reference_out), "pid": first.pid}


def test_a_second_train_on_the_same_out_is_refused(concurrent_runs):
    second = concurrent_runs["second"]
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    expected = f"error: {concurrent_runs['shared']} is in use by process {concurrent_runs['pid']} (started "
    assert expected in second.stderr and "wait for it or pick another --out" in second.stderr


def test_the_first_train_finishes_with_the_weights_of_a_lone_run(concurrent_runs):
    assert concurrent_runs["first"][0] == 0, concurrent_runs["first"][2][-3000:]
    assert concurrent_runs["reference"][0] == 0, concurrent_runs["reference"][2][-3000:]
    ours = read_tensor_file(concurrent_runs["shared"] / HOOK / "sae_weights.safetensors")
    lone = read_tensor_file(concurrent_runs["lone"] / HOOK / "sae_weights.safetensors")
    assert ours.keys() == lone.keys()
    difference = max((ours[name] - lone[name]).abs().max().item() for name in ours)
    print(f"max weight difference vs a lone run: {difference}")
    assert difference == 0.0
    assert not (concurrent_runs["shared"] / LOCK_FILE).exists()


def test_fewer_tokens_into_an_existing_out_is_refused_not_served_the_old_dictionary(concurrent_runs,
                                                                                    tiny_llama_folder, text_corpus):
    shared = concurrent_runs["shared"]
    weights = (shared / HOOK / "sae_weights.safetensors").read_bytes()
    result = subprocess.run(_train_argv(tiny_llama_folder, text_corpus, shared, tokens=1500), cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "already holds an activation store made with other settings: context count (from --tokens) 200, not 100" \
        in result.stderr
    assert (shared / HOOK / "sae_weights.safetensors").read_bytes() == weights


# --- reuse of trained dictionaries -------------------------------------------------------------------------


def test_a_trained_folder_is_reused_only_when_its_settings_match(concurrent_runs, tmp_path, text_corpus):
    import shutil

    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.train import TrainRequest, reuse_mismatch

    folder = concurrent_runs["shared"] / HOOK
    model = json.loads((folder / "cfg.json").read_text())["model_name"]
    corpus = load_corpus(str(text_corpus))
    request = TrainRequest(hooks=[HOOK], tokens=3000, epochs=4, context_size=16, batch_size=128, lr=3e-3)
    assert reuse_mismatch(folder, request, hook=HOOK, model_name=model, corpus=corpus) is None
    fewer = TrainRequest(hooks=[HOOK], tokens=1500, epochs=4, context_size=16, batch_size=128, lr=3e-3)
    assert "tokens 3000, not 1500" in reuse_mismatch(folder, fewer, hook=HOOK, model_name=model, corpus=corpus)
    assert "model" in reuse_mismatch(folder, request, hook=HOOK, model_name="other", corpus=corpus)
    broken = shutil.copytree(folder, tmp_path / HOOK)
    (broken / "cfg.json").unlink()
    assert "has no cfg.json" in reuse_mismatch(broken, request, hook=HOOK, model_name=model, corpus=corpus)


def test_the_argument_check_refuses_a_folder_in_use_without_changing_it(tmp_path):
    import fcntl

    from sae.locking import check_not_in_use

    check_not_in_use(tmp_path)  # no lock file: free
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename,
                                                  "started": "then", "command": "train"}))
    check_not_in_use(tmp_path)  # a stale lock: free (taken over when the command starts)
    holder = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(FolderInUseError, match="is in use by process"):
            check_not_in_use(tmp_path)
    finally:
        os.close(holder)
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE]
