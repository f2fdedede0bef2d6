"""Autointerp (tasks.autointerp, `sparse-circuits autointerp`): scoring math on hand cases, the disk cache, the
HTTP client against real servers (a subprocess serving a tiny local model; in-process servers answering 429 then
200, garbage, nothing), malformed responses recorded, the pipeline end to end on a tiny model, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tasks.autointerp import (CachedClient, EndpointError, Excerpt, FeatureExcerpts, HttpClient, LocalClient,
                              MalformedResponse, accuracy, auc, derangement, interpret_features, mean_with_interval,
                              pearson, simulation_score)
from tasks.autointerp.explain import parse_explanation
from tasks.autointerp.simulate import likelihood_segments, parse_simulation

ROOT = Path(__file__).resolve().parents[1]
CHAT_OK = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "the word cat"}}]}


# ----------------------------------------------------------------------------- scoring math


def test_pearson_and_simulation_score_on_hand_cases():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # all tokens of all excerpts together: [0, 5] + [0, 0, 1] against [1, 9] + [1, 1, 3]
    assert simulation_score([[0, 5], [0, 0, 1]], [[1, 9], [1, 1, 3]]) == pytest.approx(pearson([0, 5, 0, 0, 1],
                                                                                               [1, 9, 1, 1, 3]))
    assert simulation_score([[0, 5]], [[2, 2]]) == 0.0  # a constant simulation predicts nothing


def test_auc_accuracy_and_bootstrap_on_hand_cases():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert auc([0.9, 0.3], [0.5]) == 0.5
    assert accuracy([0.9, 0.4], [0.1, 0.6]) == pytest.approx(0.5)
    assert accuracy([1.0], [0.0]) == 1.0
    mean, low, high = mean_with_interval([0.1, 0.2, 0.3, float("nan")])
    assert mean == pytest.approx(0.2) and 0.1 <= low <= mean <= high <= 0.3
    assert sorted(derangement(5, 0)) == list(range(5)) and all(i != v for i, v in enumerate(derangement(5, 0)))


def test_parsing_explanations_and_simulations():
    assert parse_explanation("\n  Explanation: \"animals, mostly cats\"\nmore") == "animals, mostly cats"
    with pytest.raises(MalformedResponse):
        parse_explanation("  \n ... \n")
    assert parse_simulation("1\t0\n2: 7\n3 cat 10\n", 3) == [0.0, 7.0, 10.0]
    with pytest.raises(MalformedResponse):
        parse_simulation("1\t0\nno idea", 2)
    segments = likelihood_segments("cats", Excerpt(("The", " cat"), (0.0, 1.0)))
    assert len(segments) == 3 and segments[0].endswith("The\t") and segments[1].endswith(" cat\t")


# ----------------------------------------------------------------------------- clients and cache


class CountingClient:
    name, supports_likelihood = "counting", False

    def __init__(self, replies):
        self.replies, self.calls = list(replies), 0

    def complete(self, messages, max_tokens=64, temperature=0.0):
        self.calls += 1
        return self.replies[(self.calls - 1) % len(self.replies)]


def test_cache_hit_means_no_second_call(tmp_path):
    inner = CountingClient(["first"])
    client = CachedClient(inner, tmp_path / "cache")
    messages = [{"role": "user", "content": "explain"}]
    assert client.complete(messages, 8) == "first" and client.complete(messages, 8) == "first"
    assert inner.calls == 1 and (client.hits, client.misses) == (1, 1)
    again = CachedClient(CountingClient(["other"]), tmp_path / "cache")  # a rerun: answered from disk
    assert again.complete(messages, 8) == "first" and again.inner.calls == 0
    assert again.complete(messages, 9) == "other"  # other settings: another entry
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def serve_in_thread(responses):
    """An in-process HTTP server answering POSTs with (status, body bytes) in turn (the last repeats)."""
    state = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, body = responses[min(state["n"], len(responses) - 1)]
            state["n"] += 1
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def test_http_client_retries_429_then_succeeds():
    server, state = serve_in_thread([(429, b"slow down"), (503, b"busy"), (200, json.dumps(CHAT_OK).encode())])
    try:
        sleeps = []
        client = HttpClient("m", f"http://127.0.0.1:{server.server_address[1]}/v1", max_retries=3,
                            sleep=sleeps.append)
        assert client.complete([{"role": "user", "content": "hi"}]) == "the word cat"
        assert state["n"] == 3 and client.requests == 3 and len(sleeps) == 2
    finally:
        server.shutdown()


def test_http_garbage_is_malformed_and_recorded_not_fatal(tmp_path):
    server, _ = serve_in_thread([(200, b"<html>not json</html>")])
    try:
        client = HttpClient("m", f"http://127.0.0.1:{server.server_address[1]}/v1", max_retries=0)
        with pytest.raises(MalformedResponse):
            client.complete([{"role": "user", "content": "hi"}])
        excerpt = Excerpt(("a", " cat"), (0.0, 3.0))
        feature = FeatureExcerpts(7, [excerpt], [], [excerpt], [excerpt], [excerpt], [Excerpt(("a",), (0.0,))])
        (result,) = interpret_features(client, [feature], progress=False)
        assert result.explanation is None and result.failures and "explanation" in result.failures[0]
    finally:
        server.shutdown()


def test_http_refusal_and_down_endpoint_are_endpoint_errors():
    server, _ = serve_in_thread([(401, b'{"error": "bad key"}')])
    try:
        with pytest.raises(EndpointError, match="HTTP 401"):
            HttpClient("m", f"http://127.0.0.1:{server.server_address[1]}/v1").complete([])
    finally:
        server.shutdown()
    port = server.server_address[1]  # closed now: nothing listens
    client = HttpClient("m", f"http://127.0.0.1:{port}/v1", max_retries=2, sleep=lambda seconds: None)
    with pytest.raises(EndpointError, match="did not answer after 3 tries"):
        client.complete([{"role": "user", "content": "hi"}])
    assert client.requests == 3


def test_malformed_simulation_is_recorded_and_scores_go_on():
    excerpt = Excerpt(("a", " cat", " sat"), (0.0, 3.0, 0.0))
    silent = Excerpt(("a", " b"), (0.0, 0.0))
    feature = FeatureExcerpts(1, [excerpt], [], [excerpt, excerpt], [silent], [excerpt], [silent])
    # explanation, then simulations: one good, one garbage, one good; then detection answers
    client = CountingClient(["cats", "1 0\n2 9\n3 0", "no numbers", "1 0\n2 0", "Yes", "No"])
    (result,) = interpret_features(client, [feature], control=False, progress=False)
    assert result.explanation == "cats" and result.n_scored_excerpts == 2
    assert any("simulation excerpt 1" in failure for failure in result.failures)
    assert result.simulation == pytest.approx(pearson([0, 3, 0, 0, 0], [0, 9, 0, 0, 0]))
    assert result.detection_accuracy == 1.0 and result.detection_auc == 1.0


# ----------------------------------------------------------------------------- a real server process


@pytest.fixture(scope="module")
def local_server(tiny_llama_folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "autointerp_server.py"), str(tiny_llama_folder),
                                "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT"), process.stderr.read()
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_http_client_against_a_real_server_process(local_server, tiny_llama_folder, tmp_path):
    client = HttpClient("tiny", local_server, timeout=60)
    messages = [{"role": "user", "content": "the cat went to the store"}]
    text = client.complete(messages, max_tokens=5)
    assert isinstance(text, str)
    assert text == LocalClient(str(tiny_llama_folder)).complete(messages, max_tokens=5)  # greedy: same words
    with pytest.raises(EndpointError, match="HTTP 404"):
        HttpClient("another-model", local_server).complete(messages)
    cached = CachedClient(client, tmp_path / "cache")
    excerpt = Excerpt(("the", " cat"), (0.0, 2.0))
    feature = FeatureExcerpts(3, [excerpt], [], [excerpt], [Excerpt(("a", " b"), (0.0, 1.0))], [excerpt],
                              [Excerpt(("a",), (0.0,))])
    (result,) = interpret_features(cached, [feature], progress=False)  # generate mode; garbage replies recorded
    assert result.feature == 3 and (result.explanation is not None or result.failures)
    before = client.requests
    interpret_features(cached, [feature], progress=False)
    assert client.requests == before  # the rerun costs nothing


def test_local_client_likelihood_rows_are_distributions(tiny_llama_folder):
    client = LocalClient(str(tiny_llama_folder))
    rows = client.option_probabilities(["the cat", " went", " to"], ["the", "a"])
    assert len(rows) == 2 and all(sum(row) == pytest.approx(1.0) for row in rows)


# ----------------------------------------------------------------------------- the command


def run_cli(*arguments, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sparse_circuits", *arguments], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory, random_sae):
    from sae.io import save_dictionary

    folder = tmp_path_factory.mktemp("sae") / "blocks.1.hook_resid_post"
    save_dictionary(random_sae(d_in=32, d_sae=48), folder)
    return folder


def test_autointerp_command_end_to_end_and_rerun_from_cache(tiny_llama_folder, text_corpus, sae_folder, tmp_path):
    common = ["autointerp", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--sae", str(sae_folder),
              "--baseline", "neurons", "--features", "2", "--tokens", "600", "--context-size", "32",
              "--client-model", str(tiny_llama_folder), "--cache-dir", str(tmp_path / "cache"), "--out",
              str(tmp_path / "out")]
    first = run_cli(*common)
    assert first.returncode == 0, first.stderr
    assert {"explanations.jsonl", "scores.csv", "summary.csv", "autointerp.json"} <= set(os.listdir(tmp_path / "out"))
    import pandas as pd

    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert set(scores["basis"]) == {"sae:blocks.1.hook_resid_post", "neurons"} and len(scores) == 4
    assert "simulation" in first.stdout
    second = run_cli(*common)
    assert second.returncode == 0 and " 0 new requests" in second.stdout
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".out.")]


def test_autointerp_bad_input_is_one_error_line_and_no_output(tiny_llama_folder, text_corpus, sae_folder, tmp_path):
    base = ["autointerp", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--sae", str(sae_folder),
            "--tokens", "300", "--context-size", "32", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "out"
    cases = {
        "out of range": (["--feature-indices", "48", "--out", str(out)], "out of range"),
        "endpoint down": (["--client", "http", "--client-model", "m", "--base-url", "http://127.0.0.1:9/v1",
                           "--retries", "0", "--out", str(out)], "did not answer"),
        "no base url": (["--client", "http", "--client-model", "m", "--out", str(out)], "--base-url"),
        "bad baseline": (["--baseline", "svd", "--out", str(out)], "unknown svd"),
    }
    for name, (arguments, expected) in cases.items():
        result = run_cli(*base, *arguments, env_extra={"OPENAI_BASE_URL": ""})
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr and result.stderr.count("error:") == 1, (name, result.stderr)
        assert not out.exists(), name
    from tests.conftest import make_random_sae
    from sae.io import save_dictionary

    other = tmp_path / "other" / "blocks.1.hook_resid_post"
    save_dictionary(make_random_sae(d_in=40, d_sae=16), other)  # another model's width
    result = run_cli(*base[:5], "--sae", str(other), *base[7:], "--out", str(out))
    assert result.returncode == 2 and "d_in=40" in result.stderr and not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = run_cli(*base, "--out", str(tmp_path / "busy"))
    assert result.returncode == 2 and "non-empty folder" in result.stderr
