"""Time to the error for every bad input in tests/test_bad_input.py, each run as a real `sparse-circuits` process.

Prints a Markdown table: case, exit code, the error line, seconds from start to exit (Python start-up and
imports included), and whether stderr held a traceback or files were left behind. {model} is the default
model (smollm2-135m) unless --model is given, so the times show that the mistake is reported before the
real model would load; cases marked `loads_model` (the mistake shows only once the model is there) get the
tests' tiny Llama, whose width matches the tiny dictionary. Example:

    python benchmarks/bad_input_timing.py --out results/bad_input_timing.md
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def load_table():
    """The CASES table and its helpers, from the test module (one list of cases for the test and this script)."""
    sys.path.insert(0, str(TESTS))  # the test module's own imports (conftest helpers) resolve from there
    spec = importlib.util.spec_from_file_location("test_bad_input", TESTS / "test_bad_input.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dictionary_folder(parent: Path) -> Path:
    """A valid random dictionary folder, as the test's fixture writes it."""
    from conftest import make_random_sae
    from sae.io import save_dictionary

    folder = parent / "blocks.1.hook_resid_post"
    save_dictionary(make_random_sae(), folder)
    return folder


def run_case(table, case, work: Path, values: dict, command: list[str]) -> dict:
    tmp = work / "case"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    argv = table.prepare(case, tmp, values)
    before = table.snapshot(tmp)
    started = time.perf_counter()
    done = subprocess.run(command + argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith(("error:", "sparse-circuits"))), lines[-1] if lines
                   else "")
    return {"case": case.name, "code": done.returncode, "expected": case.code, "message": message,
            "seconds": seconds, "traceback": "Traceback" in done.stderr,
            "left_files": table.snapshot(tmp) != before, "matches": case.message in done.stderr}


def markdown(rows: list[dict], command: str) -> str:
    out = [f"Command: `{command}`", "", f"Load average at the end: {__import__('os').getloadavg()[0]:.1f}", "",
           f"Machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPU cores, "
           f"Python {platform.python_version()}", "",
           "| case | exit | expected | seconds | traceback | files left | message |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        message = row["message"].replace("|", "\\|")
        if len(message) > 160:
            message = message[:157] + "..."
        out.append(f"| {row['case']} | {row['code']} | {row['expected']} | {row['seconds']:.2f} | "
                   f"{'YES' if row['traceback'] else 'no'} | {'YES' if row['left_files'] else 'no'} | {message} |")
    slowest = max(rows, key=lambda row: row["seconds"])
    wrong = [row["case"] for row in rows if row["code"] != row["expected"] or not row["matches"] or row["traceback"]
             or row["left_files"]]
    out += ["", f"{len(rows)} cases; slowest {slowest['seconds']:.2f} s ({slowest['case']}); median "
                f"{sorted(row['seconds'] for row in rows)[len(rows) // 2]:.2f} s; "
                f"{'all as expected' if not wrong else 'NOT as expected: ' + ', '.join(wrong)}."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="what {model} stands for (default: the default model)")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    table = load_table()
    command = [shutil.which("sparse-circuits") or sys.executable, *([] if shutil.which("sparse-circuits")
                                                                    else ["-m", "sparse_circuits"])]
    cases = [case for case in table.CASES if not args.only or args.only in case.name]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        from conftest import save_tiny_model

        values = {"model": args.model, "sae": dictionary_folder(work)}
        tiny = {**values, "model": save_tiny_model(work / "tiny_llama", "llama")}
        for case in cases:
            rows.append(run_case(table, case, work, tiny if case.loads_model else values, command))
            print(f"{rows[-1]['seconds']:6.2f} s  exit {rows[-1]['code']}  {case.name}", file=sys.stderr)
    text = markdown(rows, shlex.join(["python", *sys.argv]))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
