"""Peak memory of streaming training (`train --stream`) as the token count grows, at a fixed buffer bound.

Each setting runs `python -m sparse_circuits train --stream ...` in a fresh process; its peak resident set is
that process's ru_maxrss (os.wait4), and its RSS is also sampled every second (from /proc) so the table shows
the peak of the first and of the second half of the run: a buffer that did not bound memory would show a
second half above the first, and a peak growing with the token count.

Two models, the same code path and command:

  real   the default model (smollm2-135m) on the registry corpus: 100k and 300k tokens (it harvests only a
         few thousand tokens/s on a 2-core CPU, so 10M real tokens take hours here)
  tiny   a randomly initialised 2-layer Llama (d_model 64, the tests' word-level tokenizer) on a generated
         corpus of random words big enough for 10M tokens: 1M and 10M tokens

    python benchmarks/stream_memory.py [--settings real-100k real-300k tiny-1M tiny-10M] [--json F] [--md F]

The same corpus (and so the same document list in memory) serves every setting of a model; only --tokens
changes. Writes a JSON list of rows and a Markdown table with each exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_D_MODEL = 64
TINY_CORPUS_WORDS = 10_700_000  # > 10M tokens in the train split (98% of documents)
SETTINGS = {  # name: (model, tokens, hook, buffer tokens)
    "real-100k": ("real", 100_000, "blocks.3.hook_resid_post", 65_536),
    "real-300k": ("real", 300_000, "blocks.3.hook_resid_post", 65_536),
    "tiny-1M": ("tiny", 1_000_000, "blocks.0.hook_resid_post", 262_144),
    "tiny-10M": ("tiny", 10_000_000, "blocks.0.hook_resid_post", 262_144),
}


def make_tiny_model_and_corpus(work: Path) -> tuple[Path, Path]:
    """The tiny model folder and a JSONL corpus of random words (seeded), made once into `work`."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import WORDS, save_tiny_model

    model = work / "tiny_llama"
    if not (model / "config.json").exists():
        save_tiny_model(model, "llama", n_layers=2, d_model=TINY_D_MODEL)
    corpus = work / "random_words.jsonl"
    if not corpus.exists():
        vocabulary = [word for word in WORDS if word.isalpha()]
        generator = torch.Generator().manual_seed(0)
        per_document = 1000
        with open(corpus, "w") as handle:
            for number in range(TINY_CORPUS_WORDS // per_document):
                picks = torch.randint(len(vocabulary), (per_document,), generator=generator).tolist()
                handle.write(json.dumps({"id": f"w{number}", "text": " ".join(vocabulary[p] for p in picks)}) + "\n")
    return model, corpus


def command_for(name: str, out: Path, tiny: tuple[Path, Path] | None) -> list[str]:
    kind, tokens, hook, buffer = SETTINGS[name]
    model, corpus = (str(tiny[0]), str(tiny[1])) if kind == "tiny" else ("smollm2-135m", "registry")
    return [sys.executable, "-m", "sparse_circuits", "--threads", "2", "train", "--stream", "--model", model,
            "--corpus", corpus, "--device", "cpu", "--hook", hook, "--tokens", str(tokens),
            "--buffer-tokens", str(buffer), "--batch-size", "4096", "--expansion", "4", "--arch", "topk",
            "--k", "16", "--out", str(out)]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(command: list[str]) -> dict:
    """Run `command` in a fresh process: its ru_maxrss, wall time, and RSS samples every second."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPARSE_CIRCUITS_PROGRESS": "lines"}
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while True:  # wait4 (not poll) reaps the child, so its own rusage comes back
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        value = rss_kib(process.pid)
        if value:
            samples.append((time.time() - started, value))
        time.sleep(1.0)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    peak_kib = usage.ru_maxrss  # KiB on Linux
    wall = time.time() - started
    half = wall / 2
    first = max((value for at, value in samples if at <= half), default=0)
    second = max((value for at, value in samples if at > half), default=0)
    buffer_line = next((line.strip() for line in lines if line.startswith("stream:")), "")
    return {"peak_rss_mb": round(peak_kib / 1024, 1), "first_half_peak_mb": round(first / 1024, 1),
            "second_half_peak_mb": round(second / 1024, 1), "wall_s": round(wall, 1),
            "returncode": process.returncode, "buffer_line": buffer_line, "tail": "".join(lines[-3:]).strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--work", type=Path, default=None, help="folder for the tiny model, its corpus and the runs")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "stream_memory.json")
    parser.add_argument("--md", type=Path, default=ROOT / "results" / "stream_memory.md")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stream_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model_and_corpus(work) if any(SETTINGS[name][0] == "tiny" for name in args.settings) else None
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for name in args.settings:
        command = command_for(name, work / f"run_{name}", tiny)
        kind, tokens, hook, buffer = SETTINGS[name]
        print(f"{name}: {shlex.join(command)}", flush=True)
        row = {"setting": name, "model": "smollm2-135m (real)" if kind == "real" else
               f"tiny random Llama, d_model {TINY_D_MODEL} (random-word corpus)", "tokens": tokens, "hook": hook,
               "buffer_tokens": buffer, **measure(command),
               "command": shlex.join(["python", "-m", "sparse_circuits", *command[3:]]).replace(str(work), "TINY")}
        print(json.dumps(row), flush=True)
        rows = [existing for existing in rows if existing["setting"] != name] + [row]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        args.md.write_text(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    out = ["# Peak memory of `train --stream` at a fixed buffer bound", "",
           f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores (shared), "
           f"Python {platform.python_version()}. Written by `python benchmarks/stream_memory.py`; each row is a fresh "
           "process (peak RSS: its ru_maxrss; halves: the largest 1-second RSS sample in each half of the run).", "",
           "| setting | model | tokens | buffer (tokens) | peak RSS MB | first half MB | second half MB | wall s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {row['setting']} | {row['model']} | {row['tokens']:,} | {row['buffer_tokens']:,} | "
                   f"{row['peak_rss_mb']:,.0f} | {row['first_half_peak_mb']:,.0f} | {row['second_half_peak_mb']:,.0f} | "
                   f"{row['wall_s']:,.0f} |")
    out += ["", "Commands (run from the repository root, PYTHONPATH=.; TINY is the benchmark's work folder):", ""]
    for row in rows:
        out += [f"- {row['setting']}: `{row['command']}`", f"  - {row['buffer_line'] or '(no buffer line)'}"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
