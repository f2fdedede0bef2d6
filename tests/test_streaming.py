"""Streaming training (`train --stream`): the mixing buffer's schedule, the lazy contexts, exact resume on a tiny
model, and the CLI's flags. Rows in the buffer tests carry their own token number, so coverage is checkable."""

from __future__ import annotations

import json

import pytest
import torch

from sae.mixing_buffer import MixingBufferSource, StreamExhaustedError, plan_chunks

ROWS_PER_CONTEXT = 7


def numbered_source(n_contexts: int = 50, buffer_tokens: int = 84, window: int = 4, read_log: list | None = None):
    """A MixingBufferSource whose row j holds the number j (at two hooks, j and -j): no model needed."""
    ranges, window = plan_chunks(n_contexts, ROWS_PER_CONTEXT, buffer_tokens, window_chunks=window)
    rows = [(end - start) * ROWS_PER_CONTEXT for start, end in ranges]
    offsets = [sum(rows[:c]) for c in range(len(rows))]

    def read(chunk_ids, hooks):
        for chunk in chunk_ids:
            if read_log is not None:
                read_log.append(chunk)
            numbers = torch.arange(offsets[chunk], offsets[chunk] + rows[chunk], dtype=torch.float32)[:, None]
            yield chunk, {"a": numbers.repeat(1, 3).half(), "b": (-numbers).repeat(1, 2)}

    return MixingBufferSource(["a", "b"], {"a": 3, "b": 2}, rows, window, read)


def numbers_of(batches, count: int) -> list[torch.Tensor]:
    out = []
    for _ in range(count):
        batch = next(batches)
        assert batch["a"].dtype == torch.float32 and torch.equal(batch["a"][:, 0], -batch["b"][:, 0])
        out.append(batch["a"][:, 0].long())
    return out


def test_plan_respects_the_bound_and_covers_every_context():
    ranges, window = plan_chunks(1000, 127, 1 << 16, window_chunks=16)
    assert window == 16 and window * max(end - start for start, end in ranges) * 127 <= 1 << 16
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert plan_chunks(10, 127, 300)[1] == 2  # a buffer of two contexts: a window of two one-context chunks
    with pytest.raises(ValueError, match="cannot hold one context"):
        plan_chunks(10, 127, 100)


def test_every_token_once_mixed_across_chunks_within_the_bound():
    source = numbered_source()
    steps = source.steps_available(16)
    batches = numbers_of(source.batches(["a", "b"], 16, seed=0), steps)
    seen = torch.cat(batches)
    assert steps == source.n_tokens // 16 and len(set(seen.tolist())) == seen.numel()  # no token twice
    chunk_of = seen // 21  # 3 contexts of 7 rows per chunk
    assert max(len(set((batch // 21).tolist())) for batch in batches) > 1  # batches mix chunks
    assert chunk_of.float().std() > 0 and not torch.equal(seen, seen.sort().values)  # shuffled, not in order
    assert source.peak_buffer_rows == source.buffer_rows == 84  # 4 chunks of 21 held at most


def test_batches_are_a_function_of_the_seed():
    first = numbers_of(numbered_source().batches(["a", "b"], 16, seed=3), 10)
    again = numbers_of(numbered_source().batches(["a", "b"], 16, seed=3), 10)
    other = numbers_of(numbered_source().batches(["a", "b"], 16, seed=4), 10)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_resume_at_any_batch_is_exact_and_rereads_at_most_the_window():
    source = numbered_source()
    steps = source.steps_available(16)
    full = numbers_of(source.batches(["a", "b"], 16, seed=0), steps)
    for start in range(steps):
        log: list[int] = []
        resumed = numbered_source(read_log=log).batches(["a", "b"], 16, seed=0, start_batch=start)
        assert torch.equal(numbers_of(resumed, 1)[0], full[start])
        first_round = source.schedule(0).round_of_row(start * 16)
        assert log[0] == max(0, first_round - source.window_chunks + 1)  # re-read: the window of that round only
        assert all(torch.equal(x, y) for x, y in zip(numbers_of(resumed, steps - start - 1), full[start + 1 :]))


def test_the_stream_ends_with_a_clear_error():
    source = numbered_source()
    steps = source.steps_available(16)
    batches = source.batches(["a", "b"], 16, seed=0)
    numbers_of(batches, steps)
    with pytest.raises(StreamExhaustedError, match="each token once"):
        next(batches)
    past_the_end = source.batches(["a", "b"], 16, seed=0, start_batch=steps)  # a run resumed at its last step
    with pytest.raises(StreamExhaustedError):
        next(past_the_end)


@pytest.mark.parametrize("world", [2, 3])
def test_parts_are_disjoint_cover_the_global_batches_and_harvest_their_own_chunks(world):
    batch_size = 12 * world // 2 * 2
    steps = numbered_source().steps_available(batch_size, world)
    shares = []
    for rank in range(world):
        log: list[int] = []
        batches = numbered_source(read_log=log).batches(["a", "b"], batch_size, seed=0, part=(rank, world))
        shares.append(numbers_of(batches, steps))
        assert all(len(share) == batch_size // world for share in shares[-1])
        assert log and all(chunk % world == rank for chunk in log)  # rank r harvests chunks c with c % world == r
        assert set(((torch.cat(shares[-1]) // 21) % world).tolist()) == {rank}
    every = torch.cat([torch.cat(share) for share in shares])
    assert len(set(every.tolist())) == every.numel() == steps * batch_size  # disjoint, a full global batch each step
    assert steps >= numbered_source().n_tokens // batch_size - world  # little of the stream is left over


def test_one_part_is_the_single_process_stream():
    plain = numbers_of(numbered_source().batches(["a", "b"], 16, seed=1), 5)
    parted = numbers_of(numbered_source().batches(["a", "b"], 16, seed=1, part=(0, 1)), 5)
    assert all(torch.equal(x, y) for x, y in zip(plain, parted))
    with pytest.raises(ValueError, match="split evenly"):
        numbered_source().batches(["a", "b"], 15, seed=0, part=(0, 2))
    with pytest.raises(ValueError, match="rank"):
        numbered_source().batches(["a", "b"], 16, seed=0, part=(2, 2))


# --------------------------------------------------------------------------- on a tiny model


def test_lazy_contexts_equal_tokenize_contexts(tiny_llama, text_corpus):
    from sae.context_stream import ContextStream
    from sae.corpus import load_corpus, tokenize_contexts

    corpus = load_corpus(str(text_corpus))
    expected = tokenize_contexts(corpus, tiny_llama.tokenizer, 16, 500, seed=2)
    stream = ContextStream(corpus, tiny_llama.tokenizer, 16, seed=2)
    assert torch.equal(torch.stack(list(stream.rows(500))), expected)
    blocks = list(stream.blocks(iter([(3, 7), (7, 9), (20, 22)]), 500))
    assert [start for start, _ in blocks] == [3, 7, 20]
    assert torch.equal(torch.cat([rows for _, rows in blocks]), expected[[3, 4, 5, 6, 7, 8, 20, 21]])
    everything = tokenize_contexts(corpus, tiny_llama.tokenizer, 16, 10**6, seed=2)
    assert stream.count(10**6) == everything.shape[0] < 10**6  # the split runs out: the same count


def tiny_stream(model, corpus, buffer_tokens=600, log: list | None = None):
    from circuits.streaming import streaming_source

    source = streaming_source(model, corpus, ["blocks.1.hook_resid_post"], 6000, context_size=16,
                              buffer_tokens=buffer_tokens, progress=False)
    if log is not None:
        read = source.read_chunks
        source.read_chunks = lambda ids, hooks: (log.append(ids[0]) or read(ids, hooks))
    return source


def test_stream_batches_hold_the_models_activations(tiny_llama, text_corpus):
    from sae.corpus import load_corpus, tokenize_contexts

    corpus = load_corpus(str(text_corpus))
    source = tiny_stream(tiny_llama, corpus)
    assert source.n_tokens == 400 * 15 and source.buffer_rows <= 600
    rows = next(source.batches(["blocks.1.hook_resid_post"], 6000, seed=0))["blocks.1.hook_resid_post"]  # all
    _, cache = tiny_llama.run_with_cache(tokenize_contexts(corpus, tiny_llama.tokenizer, 16, 400),
                                         names_filter=["blocks.1.hook_resid_post"])
    stored = cache["blocks.1.hook_resid_post"][:, 1:].reshape(-1, 32).half().float()  # BOS dropped, as stored
    assert not torch.equal(rows, stored)  # shuffled
    assert torch.equal(rows.sort(dim=0).values, stored.sort(dim=0).values)  # the same activations, in float16
    assert torch.equal(rows.sum(dim=1).sort().values, stored.sum(dim=1).sort().values)


def test_streamed_training_resumes_bit_for_bit_harvesting_at_most_the_window(tiny_llama, text_corpus, tmp_path):
    from sae.config import DictionaryConfig
    from sae.corpus import load_corpus
    from sae.io import load_dictionary
    from sae.training import TrainingConfig, train_dictionaries

    corpus = load_corpus(str(text_corpus))
    training = TrainingConfig(total_tokens=6000 // 128 * 128, batch_size=128, lr=3e-3, checkpoint_every=10, log_every=5)
    config = DictionaryConfig("standard", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post", l1_coefficient=1e-3)
    train_dictionaries(tiny_stream(tiny_llama, corpus), [config], training, tmp_path / "whole", progress=False)
    train_dictionaries(tiny_stream(tiny_llama, corpus), [config], training, tmp_path / "split", progress=False,
                       stop_after_steps=27)
    log: list[int] = []
    resumed_source = tiny_stream(tiny_llama, corpus, log=log)
    train_dictionaries(resumed_source, [config], training, tmp_path / "split", progress=False)
    whole = load_dictionary(tmp_path / "whole" / "blocks.1.hook_resid_post")
    split = load_dictionary(tmp_path / "split" / "blocks.1.hook_resid_post")
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items()):
        assert torch.equal(a, b), name
    plan = resumed_source.schedule(0)
    first_round = plan.round_of_row(27 * 128)  # resumed from the checkpoint stop_after_steps wrote
    assert log == [max(0, first_round - plan.window + 1)] and first_round > plan.window  # not from chunk 0
    assert resumed_source.peak_buffer_rows <= 600


# --------------------------------------------------------------------------- the command line


def stream_argv(model_folder, corpus, out, *extra):
    return ["train", "--model", str(model_folder), "--corpus", str(corpus), "--hook", "blocks.1.hook_resid_post",
            "--tokens", "3000", "--context-size", "16", "--batch-size", "128", "--out", str(out), "--stream",
            "--buffer-tokens", "960", *extra]


def test_train_stream_writes_dictionaries_and_no_activations(tiny_llama_folder, text_corpus, tmp_path, capsys):
    from sparse_circuits.cli.main import main

    assert main(stream_argv(tiny_llama_folder, text_corpus, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "buffer of 960 tokens" in printed and "nothing is written to disk" in printed
    assert not (tmp_path / "out" / "activations").exists()
    cfg = json.loads((tmp_path / "out" / "blocks.1.hook_resid_post" / "cfg.json").read_text())
    assert cfg["extra"]["request"]["stream"]["buffer_tokens"] <= 960 and cfg["extra"]["training_complete"]
    assert cfg["extra"]["trained_tokens"] == 3000 // 128 * 128


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "2"], "--epochs must be 1"),
    (["--target-l0", "5"], "Calibrate on a stored harvest first"),
    (["--activations", "{tmp}/acts"], "--activations does not apply"),
    (["--buffer-tokens", "100"], "fewer tokens than one batch"),
])
def test_bad_stream_flags_are_error_lines(tiny_llama_folder, text_corpus, tmp_path, capsys, extra, message):
    from sparse_circuits.cli.main import main

    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    assert main(stream_argv(tiny_llama_folder, text_corpus, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_buffer_flag_without_stream_is_an_error_line(tiny_llama_folder, text_corpus, tmp_path, capsys):
    from sparse_circuits.cli.main import main

    argv = [value for value in stream_argv(tiny_llama_folder, text_corpus, tmp_path / "out") if value != "--stream"]
    assert main(argv) == 2
    assert "give --stream too" in capsys.readouterr().err


def test_train_stream_killed_with_sigkill_resumes_bit_for_bit(tiny_llama_folder, text_corpus, tmp_path):
    """A real kill -9 mid-run (after a checkpoint), then the same command: the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from sae.io import load_dictionary
    from sparse_circuits.cli.main import main

    def argv(out):
        return [*stream_argv(tiny_llama_folder, text_corpus, out, "--checkpoint-every", "5")[:-2], "--buffer-tokens",
                "1920", "--tokens", "8000"]  # later --tokens wins: 62 steps

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    # The process kills itself with SIGKILL right after its checkpoint at step 10 (a deterministic moment: the
    # tiny run is too fast to kill from outside after its first checkpoint reliably).
    kill_after_step_10 = (
        "import os, signal, sys\n"
        "import sae.training.loop as loop\n"
        "original = loop.write_checkpoint\n"
        "def write_then_die(*args, **kwargs):\n"
        "    path = original(*args, **kwargs)\n"
        "    if args[1] >= 10:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return path\n"
        "loop.write_checkpoint = write_then_die\n"
        "from sparse_circuits.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.run([sys.executable, "-c", kill_after_step_10, *argv(killed)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert list(killed.glob("checkpoints/step_*/state.json")) and not (killed / "blocks.1.hook_resid_post").exists()
    assert main(argv(killed)) == 0
    assert main(argv(tmp_path / "whole")) == 0
    resumed = load_dictionary(killed / "blocks.1.hook_resid_post").state_dict()
    whole = load_dictionary(tmp_path / "whole" / "blocks.1.hook_resid_post").state_dict()
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[key], whole[key]) for key in whole)


def test_buffer_in_bytes_bounds_every_hook_together(tiny_llama, text_corpus):
    from circuits.streaming import streaming_source
    from sae.corpus import load_corpus

    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    source = streaming_source(tiny_llama, load_corpus(str(text_corpus)), hooks, 6000, context_size=16,
                              buffer_bytes=64 * 1024, dtype="float32", progress=False)
    assert 0.75 * 64 * 1024 < source.buffer_rows * (32 + 32) * 4 <= 64 * 1024
    batch = next(source.batches(hooks, 128, seed=0))
    assert source.peak_buffer_rows <= source.buffer_rows and set(batch) == set(hooks)
