"""The model behind autointerp, as one small interface with two implementations.

- `Client` (a Protocol): `complete(messages, max_tokens, temperature) -> str` for chat messages
  `[{"role": "system"|"user"|"assistant", "content": str}]`; `name` identifies the model (cache keys);
  `supports_likelihood` says whether it also offers `option_probabilities` (next-token probabilities of a
  few options after each segment of a text: the likelihood-based simulation and detection).
- `HttpClient`: an OpenAI-compatible `POST {base_url}/chat/completions` (vLLM, llama.cpp's server, ollama,
  hosted APIs) over urllib; 429, 5xx, timeouts and refused connections retry with exponential backoff.
- `LocalClient`: a transformers causal LM from a folder (or a registry model such as the default
  smollm2-135m), chat template when its tokenizer has one, else a plain "User:/Assistant:" format.

A response that arrives but cannot be read is `MalformedResponse` (callers record it and go on); an endpoint
that does not answer after the retries, or refuses the request (401, 404), is `EndpointError`.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol, runtime_checkable

RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)


class EndpointError(ConnectionError):
    """The endpoint cannot be used (down after every retry, or it refused the request); the message says what to check."""


class MalformedResponse(ValueError):
    """A response arrived but is not what was asked for; recorded per item, never fatal to a run."""


@runtime_checkable
class Client(Protocol):
    name: str
    supports_likelihood: bool

    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0) -> str: ...


class HttpClient:
    """OpenAI-compatible chat completions. `base_url` ends where `/chat/completions` is appended, e.g.
    http://localhost:8000/v1; the key and URL default to OPENAI_API_KEY and OPENAI_BASE_URL."""

    supports_likelihood = False

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, sleep=time.sleep):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ValueError("the HTTP client needs a base URL: give --base-url (e.g. http://localhost:8000/v1) or "
                             "set OPENAI_BASE_URL")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {base_url!r} is not an http:// or https:// URL")
        if not model:
            raise ValueError("the HTTP client needs a model name (--client-model), as the server knows it")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.sleep = sleep
        self.name = f"http:{self.base_url}:{model}"
        self.requests = 0  # HTTP requests sent, retries included

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()
        return parse_chat_response(self._post(body))

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, last_retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt, last_retry_after))
            last_retry_after = None
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                text = error.read()[:300].decode("utf-8", "replace")
                if error.code not in RETRIED_STATUS:
                    raise EndpointError(f"{self.url} refused the request: HTTP {error.code} {text!r} (check "
                                        "--client-model, --api-key / OPENAI_API_KEY and --base-url)") from None
                last, last_retry_after = f"HTTP {error.code} {text!r}", error.headers.get("Retry-After")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = str(getattr(error, "reason", None) or error)
        raise EndpointError(f"{self.url} did not answer after {self.max_retries + 1} tries (last: {last}); is the "
                            "server running, and is --base-url right?")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter; a server's Retry-After (seconds) is honoured up to max_backoff."""
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff) * (0.5 + random.random() / 2)


def parse_chat_response(raw: bytes) -> str:
    """The text of the first choice of an OpenAI chat-completions response, or MalformedResponse."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise MalformedResponse(f"not a chat-completions response: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise MalformedResponse(f"the response's message content is not text: {content!r:.200}")
    return content


def plain_prompt(messages: list[dict]) -> str:
    """The chat as plain text, for tokenizers without a chat template (base models)."""
    names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
    parts = [names.get(message["role"], f"{message['role']}: ") + message["content"] for message in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


class LocalClient:
    """A transformers causal LM on this machine: `model` is a registry name (smollm2-135m) or an HF folder."""

    supports_likelihood = True

    def __init__(self, model: str = "smollm2-135m", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from circuits.models import KNOWN_MODELS, fetch_model, transformers_bars_silenced

        folder = fetch_model(model.lower()) if model.lower() in KNOWN_MODELS else Path(model).expanduser()
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"--client-model {model}: not a known model ({', '.join(KNOWN_MODELS)}) nor a Hugging "
                             "Face folder with config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with transformers_bars_silenced():
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        self.model.eval().to(device)
        self.device = device
        self.name = f"local:{Path(folder).resolve()}"
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 2048) or 2048

    def render(self, messages: list[dict]) -> str:
        """The prompt text the model reads: its chat template with the assistant turn opened, or plain_prompt."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_prompt(messages)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0) -> str:
        import torch

        ids = self._ids(self.render(messages))[-(self.max_positions - max_tokens):]  # the end of an over-long prompt
        inputs = torch.tensor([ids], device=self.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                                         pad_token_id=self.tokenizer.eos_token_id, top_p=None, top_k=None, **sampling)
        return self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)

    def option_probabilities(self, segments: list[str], options: list[str]) -> list[list[float]]:
        """One forward pass over "".join(segments): after each segment but the last, the probabilities of the
        options' first tokens as the next token, renormalised over the options. [len(segments) - 1, len(options)]."""
        import torch

        option_ids = [self._ids(option)[0] for option in options]
        ids, ends = [], []
        for segment in segments:
            ids += self._ids(segment)
            ends.append(len(ids) - 1)
        if len(ids) > self.max_positions:
            raise MalformedResponse(f"the prompt has {len(ids)} tokens; the model reads at most {self.max_positions}")
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        chosen = logits[torch.tensor(ends[:-1]), :][:, option_ids]
        return torch.softmax(chosen, dim=-1).cpu().tolist()
