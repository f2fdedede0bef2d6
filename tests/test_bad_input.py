"""Every bad input is one clear `error:` line and exit 2, before any compute, and leaves no file behind.

The table `CASES` is the list of mistakes (issue 15); a new subcommand or a new check adds a `Case`.
Each case names the argv (with placeholders filled per run: {tmp} a fresh folder, {model} the tiny
Llama folder, {sae} a valid dictionary folder), files to write first (`files`, relative to {tmp},
or `setup` for anything else), the exit code and a fragment of the message. The runner checks the
code and message, that stderr has no traceback, that no file appeared under {tmp}, and the time.
Most cases fail before the model is loaded; `benchmarks/bad_input_timing.py` runs the same table as
real subprocesses and times them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

SECONDS_PER_CASE = 5.0  # the bound for argument and file mistakes


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    message: str  # a fragment of stderr (case-sensitive)
    code: int = 2
    files: dict[str, str | bytes] = field(default_factory=dict)  # {relative path under {tmp}: content}
    setup: Callable[[Path, dict], None] | None = None  # (tmp, placeholders) -> None, for anything else
    loads_model: bool = False  # the mistake can only be seen with the model (may take longer than the bound)


# ------------------------------------------------------------------------------------- file helpers

CONCEPT = {"name": "size", "positive_token": " girl", "negative_token": " boy",
           "train": {"positive": ["a", "the"], "negative": ["an", "it"]},
           "test": {"positive": ["he"], "negative": ["she"]}}
GRAPH = json.dumps({"directed": True, "multigraph": False, "graph": {}, "nodes": [], "links": []})
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def concept(**changes) -> str:
    data = json.loads(json.dumps(CONCEPT))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return json.dumps(data)


def bad_cfg(**changes) -> Callable[[Path, dict], None]:
    """A copy of the valid dictionary at {tmp}/bad_sae with cfg.json fields changed (None removes one)."""

    def setup(tmp: Path, values: dict) -> None:
        folder = shutil.copytree(values["sae"], tmp / "bad_sae")
        cfg = json.loads((folder / "cfg.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return setup


_HELD_LOCKS: list[int] = []  # descriptors of the locks `busy` holds for the rest of the session


def busy(folder: str) -> Callable[[Path, dict], None]:
    """{tmp}/folder locked as a running command holds it (an flock on its .lock, with an owner record)."""

    def setup(tmp: Path, values: dict) -> None:
        import fcntl
        import os

        (tmp / folder).mkdir(parents=True)
        path = tmp / folder / ".lock"
        path.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                    "started": "2026-01-01 00:00:00 UTC", "command": "sparse-circuits train"}))
        descriptor = os.open(path, os.O_RDWR)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        _HELD_LOCKS.append(descriptor)

    return setup


TRAIN = ["train", "--model", "{model}", "--hook", "blocks.1.hook_resid_post", "--tokens", "1000"]
TRAIN_OUT = TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/corpus.txt"]
TEXT = {"corpus.txt": "the park was open and the store was closed .\n" * 20}
IOI = ["ioi", "--model", "{model}", "--sae", "{sae}", "--out", "{tmp}/out", "--baselines", "none"]
ERASE = ["erase", "--model", "{model}", "--sae", "{sae}", "--out", "{tmp}/out", "--corpus", "{tmp}/corpus.txt"]
EVALUATE = ["evaluate", "--model", "{model}", "--corpus", "{tmp}/corpus.txt"]
TRACE = ["trace", "--model", "{model}", "--saes", "{sae}", "--out", "{tmp}/graph.json"]
EXPORT = ["export", "{tmp}/graph.json"]
DASHBOARD = ["dashboard", "--model", "{model}", "--corpus", "{tmp}/corpus.txt", "--tokens", "200", "--context-size", "16"]

CASES = [
    # --- paths
    Case("train --out is an existing file", TRAIN + ["--out", "{tmp}/corpus.txt", "--corpus", "{tmp}/corpus.txt"],
         "is an existing file", files=TEXT),
    Case("train --out under a file", TRAIN + ["--out", "{tmp}/corpus.txt/out", "--corpus", "{tmp}/corpus.txt"],
         "is a file, not a folder", files=TEXT),
    Case("export -o is a folder", EXPORT + ["-o", "{tmp}/folder"], "is a folder",
         files={"graph.json": GRAPH, "folder/keep": ""}),
    Case("export of a missing graph", ["export", "{tmp}/nothing.json", "-o", "{tmp}/out.svg"], "does not exist"),
    Case("export of a deeply nested JSON file", EXPORT + ["-o", "{tmp}/out.svg"], "nested too deeply",
         files={"graph.json": DEEP_JSON}),
    Case("export of a JSON list", EXPORT + ["-o", "{tmp}/out.svg"], "is not a sparse-circuits graph",
         files={"graph.json": "[1, 2]"}),
    Case("export of a file that is not UTF-8", EXPORT + ["-o", "{tmp}/out.svg"], "graph.json:1 is not UTF-8",
         files={"graph.json": b"\x89PNG"}),
    Case("evaluate --sae missing", EVALUATE + ["--sae", "{tmp}/no_such_sae"], "does not exist", files=TEXT),
    Case("evaluate --json is a folder", EVALUATE + ["--sae", "{sae}", "--json", "{tmp}/folder"], "is a folder",
         files={**TEXT, "folder/keep": ""}),
    Case("trace --out is a folder", ["trace", "--model", "{model}", "--saes", "{sae}", "--out", "{tmp}/folder",
                                      "--feature", "auto"], "is a folder", files={"folder/keep": ""}),
    Case("trace --saes missing", ["trace", "--model", "{model}", "--saes", "{tmp}/none", "--out", "{tmp}/g.json",
                                   "--feature", "auto"], "does not exist"),
    Case("erase --out is a file", ["erase", "--model", "{model}", "--sae", "{sae}", "--out", "{tmp}/corpus.txt",
                                    "--corpus", "{tmp}/corpus.txt"], "is an existing file", files=TEXT),
    Case("ioi --sae missing", ["ioi", "--model", "{model}", "--sae", "{tmp}/none", "--out", "{tmp}/out"],
         "does not exist"),
    Case("demo --out is a file", ["demo", "--out", "{tmp}/corpus.txt"], "is an existing file", files=TEXT),
    # --- numbers
    Case("train --epochs inf", TRAIN_OUT + ["--epochs", "inf"], "NaN and infinity are not accepted", files=TEXT),
    Case("train --epochs 1e9", TRAIN_OUT + ["--epochs", "1e9"], "more than 1,000 passes", files=TEXT),
    Case("train --l1 nan", TRAIN_OUT + ["--l1", "nan"], "NaN and infinity are not accepted", files=TEXT),
    Case("train --l1 negative", TRAIN_OUT + ["--l1", "-1"], "expected a number >= 0", files=TEXT),
    Case("train --lr nan", TRAIN_OUT + ["--lr", "nan"], "NaN and infinity are not accepted", files=TEXT),
    Case("train --lr 0", TRAIN_OUT + ["--lr", "0"], "expected a positive number", files=TEXT),
    Case("train --evaluate-tokens -5", TRAIN_OUT + ["--evaluate-tokens", "-5"], "expected an integer >= 0",
         files=TEXT),
    Case("ioi --prompts 100000000", IOI + ["--prompts", "100000000"], "expected 1 to 10,000 prompts"),
    Case("ioi --baseline-tokens 10**9", IOI + ["--baseline-tokens", "1000000000"], "expected 1 to 2,000,000 tokens"),
    Case("ioi --kl-target-fraction nan", IOI + ["--kl-target-fraction", "nan"], "NaN and infinity"),
    Case("ioi --kl-target-fraction 2", IOI + ["--kl-target-fraction", "2"], "expected a fraction in (0, 1]"),
    Case("ioi --kl-target -1", IOI + ["--kl-target", "-1"], "expected a positive number"),
    Case("ioi --names with one name", IOI + ["--names", "Mary"], "at least two comma-separated names"),
    Case("ioi --templates line without {S}", IOI + ["--templates", "{tmp}/t.txt"], "t.txt:3: {S} must appear",
         files={"t.txt": "# IOI templates\nwhen {A} and {B} went to the {PLACE} {S} gave it to\nthen {A} and {B} "
                         "met and gave it to\n"}),
    Case("ioi --templates unknown placeholder", IOI + ["--templates", "{tmp}/t.txt"],
         "t.txt:1: unknown placeholders ['C']", files={"t.txt": "when {A} and {B} and {C} met {S} said to\n"}),
    Case("ioi --templates not UTF-8", IOI + ["--templates", "{tmp}/t.txt"], "t.txt:2 is not UTF-8",
         files={"t.txt": b"when {A} and {B} met {S} said to\n\xff\n"}),
    Case("ioi --templates only comments", IOI + ["--templates", "{tmp}/t.txt"], "holds no template",
         files={"t.txt": "# nothing here\n\n"}),
    Case("ioi --templates missing", IOI + ["--templates", "{tmp}/t.txt"], "t.txt does not exist"),
    Case("export --threshold nan", EXPORT + ["-o", "{tmp}/out.svg", "--threshold", "nan"], "NaN and infinity",
         files={"graph.json": GRAPH}),
    Case("export --influence 2", EXPORT + ["-o", "{tmp}/out.svg", "--influence", "2"], "expected a fraction",
         files={"graph.json": GRAPH}),
    Case("trace --scan-contexts -1", TRACE + ["--feature", "auto", "--scan-contexts", "-1"],
         "expected an integer >= 0"),
    # --- corpus specs and files
    Case("--corpus hf:a:b:c:d", TRAIN + ["--out", "{tmp}/out", "--corpus", "hf:a:b:c:d"], "hf:NAME[:SPLIT[:FIELD]]"),
    Case("--corpus missing path", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/nothing.txt"], "does not exist"),
    Case("corpus .jsonl line is a number", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/c.jsonl"],
         "c.jsonl:2 is a JSON int, not an object", files={"c.jsonl": '{"text": "the park"}\n5\n'}),
    Case("corpus .jsonl text is a number", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/c.jsonl"],
         "c.jsonl:1 has no string 'text' field", files={"c.jsonl": '{"text": 7}\n'}),
    Case("corpus .txt not UTF-8", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/c.txt"],
         "c.txt:2 is not UTF-8", files={"c.txt": b"the park\n\xc1\xc1 was\n"}),
    Case("corpus of random bytes named .txt", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/c.txt"],
         "is not UTF-8", files={"c.txt": bytes(range(128, 256)) * 8}),
    Case("corpus .jsonl not UTF-8", TRAIN + ["--out", "{tmp}/out", "--corpus", "{tmp}/c.jsonl"],
         "c.jsonl:1 is not UTF-8", files={"c.jsonl": b'{"text": "\xff"}\n'}),
    Case("erase corpus not UTF-8", ERASE[:-1] + ["{tmp}/c.txt"], "c.txt:1 is not UTF-8", files={"c.txt": b"\xfe"}),
    # --- contexts and concept files
    Case("trace contexts not UTF-8", TRACE + ["--logit", "park", "--contexts", "{tmp}/ctx.txt"],
         "ctx.txt:3 is not UTF-8", files={"ctx.txt": b"the park\nthe store\n\xc1 x\n"}),
    Case("trace contexts missing", TRACE + ["--logit", "park", "--contexts", "{tmp}/ctx.txt"], "does not exist"),
    Case("trace contexts .jsonl line without text", TRACE + ["--logit", "park", "--contexts", "{tmp}/ctx.jsonl"],
         "ctx.jsonl:1 has no string 'text'", files={"ctx.jsonl": '{"txt": "a"}\n'}),
    Case("concept side is a string", ERASE + ["--concept", "{tmp}/c.json"],
         "train.positive is str 'a the'", files={**TEXT, "c.json": concept(train__positive="a the")}),
    Case("concept prompt is a number", ERASE + ["--concept", "{tmp}/c.json"],
         "test.negative[0] is 5", files={**TEXT, "c.json": concept(test__negative=[5])}),
    Case("concept token is a number", ERASE + ["--concept", "{tmp}/c.json"],
         "'positive_token' is 3", files={**TEXT, "c.json": concept(positive_token=3)}),
    Case("concept sides share the target token", ERASE + ["--concept", "{tmp}/c.json"],
         "as both the positive and the negative token", files={**TEXT, "c.json": concept(negative_token=" girl")}),
    Case("concept file not JSON", ERASE + ["--concept", "{tmp}/c.json"], "c.json:1 is not valid JSON",
         files={**TEXT, "c.json": "{name: size"}),
    Case("concept file not UTF-8", ERASE + ["--concept", "{tmp}/c.json"], "c.json:2 is not UTF-8",
         files={**TEXT, "c.json": b'{\n"name": "\xe9"}'}),
    Case("concept file is a list", ERASE + ["--concept", "{tmp}/c.json"], "is not a concept file",
         files={**TEXT, "c.json": "[]"}),
    Case("unknown concept", ERASE + ["--concept", "colour"], "unknown concept 'colour'", files=TEXT),
    # --- dictionary files (cfg.json)
    Case("cfg.json d_in is a string", EVALUATE + ["--sae", "{tmp}/bad_sae"], "'d_in' is '576' (str)", files=TEXT,
         setup=bad_cfg(d_in="576")),
    Case("cfg.json empty hook name", EVALUATE + ["--sae", "{tmp}/bad_sae"], "'hook_name' is empty", files=TEXT,
         setup=bad_cfg(hook_name="", metadata={})),
    Case("cfg.json tied is a string", ERASE + ["--sae", "{tmp}/bad_sae"], "'tied' is 'yes'", files=TEXT,
         setup=bad_cfg(tied="yes")),
    Case("cfg.json not JSON", TRACE + ["--feature", "auto", "--saes", "{tmp}/bad_sae"], "is not valid JSON",
         setup=lambda tmp, values: (bad_cfg()(tmp, values), (tmp / "bad_sae" / "cfg.json").write_text("{"))),
    Case("truncated weights", EVALUATE + ["--sae", "{tmp}/bad_sae"], "truncated or not a safetensors file",
         files=TEXT, setup=lambda tmp, values: (bad_cfg()(tmp, values),
                                                (tmp / "bad_sae" / "sae_weights.safetensors").write_bytes(b"\x01"))),
    # --- runtime: devices, output folders in use
    Case("train --device cuda:99", TRAIN_OUT + ["--device", "cuda:99"],
         "device 'cuda:99' is not available on this machine; available: auto", files=TEXT),
    Case("train --device banana", TRAIN_OUT + ["--device", "banana"], "device 'banana' is not a device name",
         files=TEXT),
    Case("evaluate --device cuda:99", EVALUATE + ["--sae", "{sae}", "--device", "cuda:99"], "--device: device 'cuda:99' is not available",
         files=TEXT),
    Case("train --out in use by another train", TRAIN_OUT, "/out is in use by process", files=TEXT,
         setup=busy("out"), loads_model=True),
    Case("ioi --out in use by another ioi", IOI, "/out is in use by process", setup=busy("out"), loads_model=True),
    # --- trace targets and seeds
    Case("trace --feature at a hook without a dictionary", TRACE + ["--feature", "blocks.0.hook_resid_post:1"],
         "no dictionary at blocks.0.hook_resid_post"),
    Case("trace --feature index out of range", TRACE + ["--feature", "blocks.1.hook_resid_post:5000"],
         "index 5000 is out of range"),
    Case("trace --feature not HOOK:INDEX", TRACE + ["--feature", "blocks.1.hook_resid_post"], "is not HOOK:INDEX"),
    Case("trace --logit-other without --logit", TRACE + ["--feature", "auto", "--logit-other", "x"],
         "--logit-other needs --logit"),
    Case("train --seed too large", TRAIN_OUT + ["--seed", "1" + "0" * 30], "expected a seed from 0", files=TEXT),
    Case("erase --layers -1", ERASE + ["--layers", "-1"], "expected an integer >= 0", files=TEXT),
    # --- hooks
    Case("train --hook empty", ["train", "--model", "{model}", "--hook", "", "--out", "{tmp}/out", "--corpus",
                                "{tmp}/corpus.txt"], "a hook name must be a non-empty string", files=TEXT),
    # --- dashboards
    Case("dashboard --features not a range", DASHBOARD + ["--sae", "{sae}", "--features", "5-x", "--out", "{tmp}/site"],
         "is not an index or a range", files=TEXT),
    Case("dashboard --baseline without --hook", DASHBOARD + ["--baseline", "pca", "--out", "{tmp}/site"],
         "needs --hook", files=TEXT),
    Case("dashboard --out is an existing file", DASHBOARD + ["--sae", "{sae}", "--out", "{tmp}/corpus.txt"],
         "is an existing file", files=TEXT),
    Case("dashboard --features index out of range", DASHBOARD + ["--sae", "{sae}", "--features", "0-5000",
                                                               "--out", "{tmp}/site"],
         "out of range", files=TEXT, loads_model=True),
]


# ------------------------------------------------------------------------------------- the runner


def prepare(case: Case, tmp: Path, values: dict) -> list[str]:
    """Write the case's files and return its argv with the placeholders filled."""
    for relative, content in case.files.items():
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if case.setup is not None:
        case.setup(tmp, values)
    return [part.format(tmp=tmp, **values) for part in case.argv]


def snapshot(folder: Path) -> dict[str, float]:
    """Every file and folder under `folder`, with its modification time."""
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def dictionary_folder(tmp_path_factory, random_sae) -> Path:
    from sae.io import save_dictionary

    folder = tmp_path_factory.mktemp("sae") / "blocks.1.hook_resid_post"
    save_dictionary(random_sae(), folder)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, tmp_path, tiny_llama_folder, dictionary_folder, capsys, monkeypatch):
    import circuits.models
    from sparse_circuits.cli.main import main

    if not case.loads_model:  # the mistake must be reported before the model is even loaded
        def refuse(*args, **kwargs):
            raise AssertionError(f"{case.name}: the model was loaded before the mistake was reported")

        monkeypatch.setattr(circuits.models, "load_model", refuse)
    tmp = tmp_path / "case"
    tmp.mkdir()
    argv = prepare(case, tmp, {"model": tiny_llama_folder, "sae": dictionary_folder})
    before = snapshot(tmp)
    started = time.perf_counter()
    try:
        code = main(argv)  # an exception escaping here is the traceback a user would see
    except SystemExit as exit_:  # argparse rejects a value
        code = exit_.code
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.message in err, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith(("error:", "sparse-circuits"))], err
    assert snapshot(tmp) == before, "the failed command left or changed files"
    assert case.loads_model or seconds < SECONDS_PER_CASE, f"{seconds:.1f} s to report"


FILE_MISTAKES_WITHOUT_TORCH = """
import sys
from sparse_circuits.cli.main import main
codes = [main(["export", sys.argv[1] + "/missing.json", "-o", sys.argv[1] + "/out.svg"]),
         main(["train", "--hook", "blocks.1.hook_resid_post", "--out", sys.argv[1], "--corpus", "hf:a:b:c:d"]),
         main(["erase", "--sae", sys.argv[1] + "/none", "--out", sys.argv[1] + "/out"])]
heavy = sorted(name for name in ("torch", "transformers", "transformer_lens") if name in sys.modules)
assert codes == [2, 2, 2] and not heavy, (codes, heavy)
"""


def test_file_mistakes_are_reported_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FILE_MISTAKES_WITHOUT_TORCH, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("error:") == 3 and "Traceback" not in done.stderr


def test_missing_architecture_is_assumed_with_a_warning(dictionary_folder, tmp_path):
    from sae.io import load_dictionary

    bad_cfg(architecture=None)(tmp_path, {"sae": dictionary_folder})
    with pytest.warns(UserWarning, match="no 'architecture'; assuming 'standard'"):
        dictionary = load_dictionary(tmp_path / "bad_sae")
    assert dictionary.cfg.architecture == "standard"
