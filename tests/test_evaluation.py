"""Spliced-model evaluation: exact reconstructions recover all, empty ones recover nothing."""

import pytest
import torch

from circuits.evaluation import evaluate_dictionaries
from sae.baselines import identity_basis
from sae.config import DictionaryConfig
from sae.relu import ReluSAE


def _contexts(n=6, ctx=10):
    tokens = torch.randint(3, 60, (n, ctx), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    return tokens


def test_an_exact_dictionary_changes_nothing(tiny_model):
    hook = "blocks.1.hook_resid_post"
    exact = identity_basis(tiny_model.cfg.d_model, hook_name=hook)
    [result] = evaluate_dictionaries(tiny_model, [exact], _contexts(), batch_size=4, progress=False)
    assert result["fvu"] < 1e-10
    assert result["ce_loss_spliced"] == pytest.approx(result["ce_loss_clean"], abs=1e-5)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert result["l0"] == pytest.approx(tiny_model.cfg.d_model, rel=0.05)  # one of +/- e_i per dimension


def test_a_dictionary_that_outputs_zero_is_zero_ablation(tiny_llama):
    hook = "blocks.2.hook_resid_post"
    cfg = DictionaryConfig("standard", d_in=tiny_llama.cfg.d_model, d_sae=8, hook_name=hook, apply_b_dec_to_input=False)
    empty = ReluSAE(cfg)
    with torch.no_grad():
        empty.b_enc.fill_(-1e6)  # nothing ever fires
    [result] = evaluate_dictionaries(tiny_llama, [empty], _contexts(), batch_size=4, progress=False)
    assert result["ce_loss_spliced"] == pytest.approx(result["ce_loss_zero_ablated"], abs=1e-5)
    assert result["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert result["l0"] == 0 and result["dead_fraction"] == 1.0
    assert result["fvu"] > 0.5 and result["kl"] > 0


def test_bos_position_is_left_alone_by_default(tiny_llama):
    hook = "blocks.0.hook_resid_post"
    seen = []
    cfg = DictionaryConfig("standard", d_in=tiny_llama.cfg.d_model, d_sae=4, hook_name=hook)

    class Recorder(ReluSAE):
        def forward(self, x):
            seen.append(x.shape)
            return super().forward(x)

    [result] = evaluate_dictionaries(tiny_llama, [Recorder(cfg)], _contexts(n=2, ctx=7), batch_size=2, progress=False)
    assert seen[0] == (2 * 6, tiny_llama.cfg.d_model)  # activation metrics: BOS rows excluded
    assert result["tokens"] == 2 * 6


def test_massive_activation_outliers_do_not_dominate_fvu():
    """A few huge-norm tokens (attention sinks) would otherwise hold nearly all the variance."""
    from sae.metrics import ReconstructionTotals

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=generator)
    x[7] *= 2000.0  # one massive activation, reconstructed perfectly
    reconstruction = x + 0.5 * torch.randn(1000, 16, generator=generator)
    reconstruction[7] = x[7]
    totals = ReconstructionTotals(16, 4)
    totals.update(x, reconstruction, codes=torch.ones(1000, 4))
    summary = totals.summary()
    typical = torch.ones(1000, dtype=torch.bool)
    typical[7] = False
    expected = ((reconstruction - x)[typical] ** 2).sum() / ((x[typical] - x[typical].mean(0)) ** 2).sum()
    assert summary["fvu"] == pytest.approx(expected.item(), rel=1e-6)
    assert summary["fvu"] > 0.2 and summary["fvu_all_tokens"] < 0.01  # all-token FVU hides the error
    assert summary["outlier_fraction"] == pytest.approx(1 / 1000)



def test_zero_ablation_keeps_bos_and_massive_positions(tiny_llama):
    """The engine edit evaluation uses: BOS and massive positions keep their activation, the rest is replaced."""
    from circuits.engine import ActivationMap

    activation = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    activation[1, 2] *= 500.0  # a massive activation
    edited = ActivationMap(torch.zeros_like)(activation)
    assert torch.equal(edited[:, 0], activation[:, 0]) and torch.equal(edited[1, 2], activation[1, 2])
    assert (edited[0, 1:] == 0).all() and (edited[1, 1] == 0).all() and (edited[1, 3:] == 0).all()
    everywhere = ActivationMap(torch.zeros_like, pass_massive=False)(activation)
    assert (everywhere[1, 1:] == 0).all()


def test_ce_and_kl_are_summed_over_position_windows_without_changing_results(tiny_llama, random_sae, monkeypatch):
    """Evaluation never unembeds more than a window of positions at once: with one-position windows (what a
    262k vocabulary gets on a small budget) the numbers equal wide windows and a full-logit computation."""
    import circuits.evaluation as evaluation
    from circuits.metrics import cross_entropy, position_windows

    hook = "blocks.1.hook_resid_post"
    cfg = DictionaryConfig("standard", d_in=tiny_llama.cfg.d_model, d_sae=64, hook_name=hook)
    sae = ReluSAE(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.3)
    contexts = _contexts(n=8, ctx=10)
    [wide] = evaluate_dictionaries(tiny_llama, [sae], contexts, batch_size=8, progress=False)
    assert list(position_windows(10, 1, 8, 100, budget=8 * 100 * 4)) == [(a, a + 1) for a in range(1, 9)]
    assert list(position_windows(10, 0, 8, 100)) == [(0, 9)]  # a small vocabulary: one window
    widths = []

    def narrow_windows(positions, start, rows, vocab):
        for a, b in position_windows(positions, start, rows, vocab, budget=rows * vocab * 4):
            widths.append(b - a)
            yield a, b

    monkeypatch.setattr(evaluation, "position_windows", narrow_windows)
    [narrow] = evaluate_dictionaries(tiny_llama, [sae], contexts, batch_size=8, progress=False)
    assert set(widths) == {1}
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "kl", "fvu", "l0"):
        assert narrow[key] == pytest.approx(wide[key], rel=1e-5, abs=1e-6), key
    with torch.no_grad():  # the clean CE from the model's own full logits
        full = tiny_llama(contexts)
    expected = cross_entropy(full, contexts, 1).item() / (8 * 8)
    assert wide["ce_loss_clean"] == pytest.approx(expected, rel=1e-5)
