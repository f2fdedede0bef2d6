"""Shared fixtures: tiny randomly initialised GPT-2, Llama and Gemma-3 models (built here, no download)
behind a word-level tokenizer, loaded through the same `load_model(folder)` path as real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a an and to of in on at with for was is it he she they his her them there this that "
    "went store park school office house garden gave give drink book ball gift letter apple ring "
    "when then after while had did said made took got saw met "
    "Mary John Tom Anna James Sarah David Emma Paul Lisa Mark Alice Bob Kate Peter Rose "
    "male female man woman boy girl name my I am . , ! ?"
).split()
SPECIALS = ["<unk>", "<bos>", "<eos>"]


def build_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<eos>")


def save_tiny_model(folder: Path, architecture: str, seed: int = 0, n_layers: int = 4, d_model: int = 32) -> Path:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    tokenizer = build_word_tokenizer()
    vocab = len(tokenizer)
    if architecture == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2)
    elif architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
    elif architecture == "gemma3":
        # Sliding window 4, alternating with full attention: Gemma-3's mix shows beyond 4 tokens.
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=d_model // 4, sliding_window=4, max_position_embeddings=128,
                                  layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
                                  final_logit_softcapping=None, tie_word_embeddings=True,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    else:
        raise ValueError(architecture)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_gemma_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), "gemma3")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_folder):
    from circuits.models import load_model

    return load_model(str(tiny_llama_folder), device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_folder):
    from circuits.models import load_model

    return load_model(str(tiny_gpt2_folder), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma(tiny_gemma_folder):
    from circuits.models import load_model

    return load_model(str(tiny_gemma_folder), device="cpu")


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture(scope="session")
def real_model():
    """The real default model (SmolLM2-135M); fetched into the cache on first use."""
    from circuits.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(autouse=True)
def _threads_for_the_model_size(request):
    """Tiny models run fastest on one thread (no spin-waiting); the real model uses the cores."""
    wanted = min(4, os.cpu_count() or 1) if request.node.get_closest_marker("integration") else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(previous)


def make_random_sae(d_in: int = 32, d_sae: int = 64, seed: int = 0, hook: str = "blocks.1.hook_resid_post"):
    """An untrained tied ReLU SAE with nonzero biases, so that codes are not trivially zero."""
    from sae.config import DictionaryConfig
    from sae.registry import build_dictionary

    sae = build_dictionary(DictionaryConfig("standard", d_in=d_in, d_sae=d_sae, hook_name=hook, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=generator))
    return sae.eval()


@pytest.fixture(scope="session")
def random_sae():
    """A factory: random_sae(d_in=32, d_sae=64, seed=0, hook=...) -> a fresh untrained SAE (never shared)."""
    return make_random_sae


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A JSONL corpus of 400 documents of 60 random words of the tiny tokenizer's vocabulary (seeded)."""
    import json

    folder = tmp_path_factory.mktemp("corpus")
    generator = torch.Generator().manual_seed(0)
    vocabulary = [w for w in WORDS if w.isalpha()]
    with open(folder / "corpus.jsonl", "w") as handle:
        for d in range(400):
            picks = torch.randint(len(vocabulary), (60,), generator=generator).tolist()
            handle.write(json.dumps({"id": f"d{d}", "text": " ".join(vocabulary[p] for p in picks)}) + "\n")
    return folder / "corpus.jsonl"


def sparse_data(n_tokens: int, d_in: int, n_true: int, active: int, seed: int = 0):
    """Tokens that are sparse nonnegative combinations of `active` of `n_true` unit directions, plus an offset."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d_in, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n_tokens, n_true, generator=generator).argsort(dim=1)[:, :active]
    magnitudes = torch.rand(n_tokens, active, generator=generator) * 2 + 0.5
    coefficients = torch.zeros(n_tokens, n_true).scatter_(1, chosen, magnitudes)
    offset = torch.randn(d_in, generator=generator) * 0.5
    return (coefficients @ directions) * 3.0 + offset, directions
