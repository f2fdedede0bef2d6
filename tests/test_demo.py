"""The demo's clean-up: what it deletes at the end and what it keeps."""

from __future__ import annotations

from sparse_circuits.demo import folder_size, intermediate_folders, remove_intermediates


def test_remove_intermediates_keeps_results(tmp_path):
    kept = [tmp_path / "saes" / "blocks.10.hook_resid_post" / "sae_weights.safetensors",
            tmp_path / "ioi" / "summary.csv", tmp_path / "erasure" / "erasure.csv"]
    removed = [tmp_path / "saes" / "activations" / "shard_0.npy",
               tmp_path / "saes" / "checkpoints" / "step_50" / "state.safetensors",
               tmp_path / "ioi" / "baselines" / "checkpoints" / "step_1" / "dense.safetensors"]
    for path in kept + removed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    assert {folder.name for folder in intermediate_folders(tmp_path)} == {"activations", "checkpoints"}
    assert remove_intermediates(tmp_path) == 30
    assert all(path.exists() for path in kept) and not any(path.exists() for path in removed)
    assert folder_size(tmp_path) == 30 and remove_intermediates(tmp_path) == 0
