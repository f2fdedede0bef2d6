"""`sparse-circuits train --stream`: train SAEs from activations harvested into a bounded in-memory buffer.

For token counts that do not fit on disk: nothing is written to OUT/activations; the model runs over the
corpus as training consumes batches (circuits.streaming, sae/mixing_buffer.py), and memory is bounded by
the buffer. The contexts, the dictionaries' configs and the training schedule are those of
`pipelines.train.train_on_model` for the same request; only the batch order differs (a window of the stream
is shuffled instead of the whole harvest). Resuming after a kill is exact and re-harvests at most the buffer.
"""

from __future__ import annotations

from pathlib import Path

from circuits.models import model_name_of
from circuits.streaming import DEFAULT_BUFFER_TOKENS, streaming_source
from sae.activation_store import DTYPES
from sae.corpus import Corpus
from sae.locking import folder_lock
from sae.registry import architecture_class
from sae.training import TrainResult, train_dictionaries
from sparse_circuits.pipelines.train import TrainRequest, calibrated_configs, request_record, training_schedule

MEGABYTE = 1 << 20


def check_stream_request(request: TrainRequest) -> None:
    """What streaming cannot do, as errors a user can act on (ValueError)."""
    if request.epochs != 1:
        raise ValueError(f"--stream trains on each token once, so --epochs must be 1 (got {request.epochs:g}); "
                         "harvest to disk (train without --stream) to train several epochs")
    if request.activations_dir is not None:
        raise ValueError("--stream writes no activations, so --activations does not apply; drop one of them")
    uses_k = getattr(architecture_class(request.architecture), "sparsity_setting", "l1_coefficient") == "k"
    if request.target_l0 is not None and not uses_k:
        raise ValueError("--target-l0 with --stream is not supported for coefficient architectures (relu, jumprelu): "
                         "its calibration pilots would run the model over the whole stream several more times. "
                         "Calibrate on a stored harvest first (train --target-l0 N without --stream, on fewer "
                         "--tokens), then stream with the --l1 it reports")


def stream_train_on_model(model, corpus: Corpus, request: TrainRequest, out_dir: str | Path, *,
                          buffer_tokens: int | None = None, buffer_mb: float | None = None, progress: bool = True,
                          stop_after_steps: int | None = None) -> list[TrainResult]:
    """Train every requested SAE from a stream of `request.tokens` activations held in a buffer of
    `buffer_tokens` tokens (or `buffer_mb` megabytes of activations at all hooks in `request.store_dtype`;
    default 2^20 tokens). `out_dir` is locked for the run; rerunning resumes from its last checkpoint."""
    check_stream_request(request)
    if buffer_tokens is not None and buffer_mb is not None:
        raise ValueError("give the buffer as tokens or as megabytes, not both")
    with folder_lock(out_dir):
        source = streaming_source(model, corpus, request.hooks, request.tokens, context_size=request.context_size,
                                  buffer_tokens=buffer_tokens if buffer_tokens is not None else DEFAULT_BUFFER_TOKENS,
                                  buffer_bytes=None if buffer_mb is None else int(buffer_mb * MEGABYTE),
                                  seed=request.seed, dtype=request.store_dtype,
                                  harvest_batch_size=request.harvest_batch_size, progress=progress)
        if source.buffer_rows < request.batch_size:
            raise ValueError(f"the stream buffer holds {source.buffer_rows:,} tokens, fewer than one batch of "
                             f"{request.batch_size:,}; give a larger --buffer-tokens/--buffer-mb or a smaller --batch-size")
        steps = source.steps_available(request.batch_size)
        if steps == 0:
            raise ValueError(f"the stream holds {source.n_tokens} tokens, less than one batch of {request.batch_size}; "
                             "ask for more --tokens or a smaller --batch-size")
        if progress:
            print(describe_buffer(source, request.store_dtype))
        training = training_schedule(request, steps * request.batch_size)  # one epoch (checked)
        configs = request.dictionary_configs(source.d_in, model_name_of(model))
        if request.target_l0 is not None:  # k architectures only (check_stream_request): k = target, no pilots
            configs = calibrated_configs(source, configs, training, request, Path(out_dir), progress=progress)
        record = {**request_record(request, corpus), "stream": {
            "buffer_tokens": source.buffer_rows, "window_chunks": source.window_chunks,
            "contexts_per_chunk": source.contexts_per_chunk}}
        for config in configs:
            config.extra["request"] = record
        return train_dictionaries(source, configs, training, out_dir, progress=progress,
                                  stop_after_steps=stop_after_steps)


def describe_buffer(source, dtype: str) -> str:
    """One line: the buffer's bound in tokens and bytes, and how the stream is cut."""
    bytes_per_token = sum(source.d_in(hook) for hook in source.hooks) * DTYPES[dtype].itemsize
    return (f"stream: {source.n_tokens:,} tokens through a buffer of {source.buffer_rows:,} tokens "
            f"({source.buffer_rows * bytes_per_token / MEGABYTE:,.1f} MB of {dtype} activations: "
            f"{source.window_chunks} chunks of {source.contexts_per_chunk} contexts); nothing is written to disk")
