"""The sparse backward passes (sae/sparse_backward.py) give autograd's gradients, for every architecture that
uses them, tied or not, with free decoder rows or not, with AuxK active, and under bf16 autocast."""

import copy

import pytest
import torch

import sae.sparse_backward as sparse_backward
from sae.config import DictionaryConfig
from sae.dictionary import TrainingState
from sae.registry import build_dictionary
from sae.sparse_backward import SelectablePreActivations, sparse_decode, transposed_sparse_product


def test_transposed_product_equals_the_dense_product_with_repeated_entries():
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 0, 1, 3, 3, 2, 0])
    columns = torch.tensor([4, 1, 4, 0, 0, 2, 4])  # (3, 0) twice: the values add
    values = torch.randn(7, generator=generator)
    x = torch.randn(4, 3, generator=generator)
    dense = torch.zeros(4, 5).index_put_((rows, columns), values, accumulate=True)
    assert torch.allclose(transposed_sparse_product(rows, columns, values, x, 5), dense.T @ x, atol=1e-6)


def test_selected_entries_have_autograds_gradient_for_x_weight_and_bias():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=generator, requires_grad=True)
    rows = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4], [5, 5]])
    columns = torch.tensor([[1, 8], [0, 1], [3, 4], [8, 2], [5, 1], [7, 6]])
    upstream = torch.randn(6, 2, dtype=torch.float64, generator=generator)

    selected = SelectablePreActivations(x, weight, bias).at(rows, columns)
    ours = torch.autograd.grad((selected * upstream).sum(), (x, weight, bias))
    reference = torch.autograd.grad(((torch.addmm(bias, x, weight)[rows, columns]) * upstream).sum(), (x, weight, bias))
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine, theirs, atol=1e-12)


def test_sparse_decode_has_autograds_gradient_in_both_layouts():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(10, 4, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 4, generator=generator)
    per_token = (torch.tensor([[1, 7], [7, 2], [0, 9]]), torch.randn(3, 2, generator=generator), None)
    flat = (torch.tensor([3, 1, 7, 2, 2]), torch.randn(5, generator=generator), torch.tensor([0, 2, 2]))  # an empty bag
    for columns, values, offsets in (per_token, flat):
        values = values.clone().requires_grad_()
        ours = torch.autograd.grad((sparse_decode(columns, weight, values, offsets) * upstream).sum(), (weight, values))
        plain = torch.nn.functional.embedding_bag(columns, weight, offsets, per_sample_weights=values, mode="sum")
        reference = torch.autograd.grad((plain * upstream).sum(), (weight, values))
        for mine, theirs in zip(ours, reference):
            assert torch.allclose(mine, theirs, atol=1e-5)


CASES = [("topk", False, False), ("topk", True, False), ("topk", False, True), ("batchtopk", False, False),
         ("batchtopk", True, False), ("standard", False, False), ("standard", True, False), ("standard", False, True)]


def _loss_and_gradients(sae, x, dead, free, autocast):
    sae = copy.deepcopy(sae)
    state = TrainingState(step=3, sparsity_ramp=1.0, dead=dead, aux_k_coefficient=0.5,
                          decoder_norms=sae.W_dec.norm(dim=1) if free else None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sae.training_loss(x, state)
    out.loss.backward()
    return out, {name: parameter.grad for name, parameter in sae.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("architecture,tied,free", CASES)
def test_training_losses_match_the_ordinary_autograd_path(monkeypatch, architecture, tied, free, autocast):
    options = {"l1_coefficient": 0.01} if architecture == "standard" else {"k": 6}
    cfg = DictionaryConfig(hook_name="h", d_in=16, d_sae=256, architecture=architecture, tied=tied, **options)
    sae = build_dictionary(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=generator))
        # ReLU: mostly inactive codes (under SPARSE_DECODE_DENSITY), so the sparse path is the one tested
        sae.b_enc.fill_(-2.2 if architecture == "standard" else 0.0)
    x = torch.randn(64, 16, generator=generator)
    dead = torch.rand(256, generator=generator) < 0.5  # AuxK on for TopK and BatchTopK
    out, ours = _loss_and_gradients(sae, x, dead, free, autocast)
    if architecture == "standard":
        assert (out.codes != 0).float().mean() < 0.05
    monkeypatch.setattr(sparse_backward, "sparse_backward_on", lambda device: False)  # plain autograd (as off CPU)
    reference_out, reference = _loss_and_gradients(sae, x, dead, free, autocast)
    tolerance = 2e-2 if autocast else 1e-5
    assert torch.allclose(out.loss, reference_out.loss, rtol=tolerance)
    assert torch.equal(out.codes != 0, reference_out.codes != 0)
    assert set(ours) == set(reference)
    for name, gradient in ours.items():
        scale = reference[name].abs().max().clamp_min(1e-6)
        assert (gradient - reference[name]).abs().max() <= tolerance * scale, name
