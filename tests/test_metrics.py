"""Model-output metrics: KL, cross-entropy and logit difference against torch's own, in and across chunks."""

import math

import torch
import torch.nn.functional as F

from circuits.metrics import CHUNK_ROWS, cross_entropy, kl_divergence, logit_difference, spearman, summed_kl


def test_kl_matches_torch_across_chunk_boundaries():
    generator = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, CHUNK_ROWS + 7, 50, generator=generator), torch.randn(2, CHUNK_ROWS + 7, 50, generator=generator)
    expected = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected, rtol=1e-5, atol=1e-6)
    assert kl_divergence(p, p).abs().max() < 1e-5
    torch.testing.assert_close(summed_kl(p, q, start=1).float(), expected[:, 1:-1].sum(), rtol=1e-5, atol=1e-4)


def test_cross_entropy_is_the_summed_next_token_loss():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, CHUNK_ROWS, 40, generator=generator)
    tokens = torch.randint(0, 40, (3, CHUNK_ROWS), generator=generator)
    expected = F.cross_entropy(logits[:, 1:-1].reshape(-1, 40), tokens[:, 2:].reshape(-1), reduction="sum")
    assert math.isclose(cross_entropy(logits, tokens, start=1).item(), expected.item(), rel_tol=1e-5)


def test_logit_difference_and_spearman():
    logits = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 0.5, 0.0]]])  # [1, m=2, vocab=3]
    diff = logit_difference(logits, torch.tensor([2, 0]), torch.tensor([1, 1]))
    assert torch.equal(diff, torch.tensor([[2.0, 1.5]]))
    assert math.isclose(spearman(torch.arange(5.0), torch.arange(5.0) ** 3), 1.0)
    assert math.isclose(spearman(torch.arange(5.0), -torch.arange(5.0)), -1.0)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))
