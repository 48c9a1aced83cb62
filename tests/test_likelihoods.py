"""Property tests of the output-space identities every estimator relies on."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc_reg.likelihoods import Bernoulli, Categorical, Gaussian

logits = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 5).flatmap(
        lambda c: st.lists(
            st.floats(-8, 8, allow_nan=False), min_size=b * c, max_size=b * c
        ).map(lambda v: torch.tensor(v, dtype=torch.float64).reshape(b, c))
    )
)


def outer_sum(vectors: torch.Tensor) -> torch.Tensor:
    """Σ_k v_k v_kᵀ per sample: (K, B, C) -> (B, C, C)."""
    return torch.einsum("kbi,kbj->bij", vectors, vectors)


@given(logits)
@settings(max_examples=40, deadline=None)
def test_categorical_exact_factor_is_expected_score_outer_product(f):
    lik = Categorical()
    p = torch.softmax(f, -1)
    b, c = f.shape
    expected = torch.zeros(b, c, c, dtype=f.dtype)
    mean_score = torch.zeros(b, c, dtype=f.dtype)
    for y in range(c):
        s = lik.score(f, torch.full((b,), y))
        expected += p[:, y, None, None] * torch.einsum("bi,bj->bij", s, s)
        mean_score += p[:, y, None] * s
    torch.testing.assert_close(outer_sum(lik.exact_vectors(f)), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(expected, torch.diag_embed(p) - torch.einsum("bi,bj->bij", p, p))
    assert mean_score.abs().max() < 1e-12  # score identity E_y[s(y)] = 0


@given(logits)
@settings(max_examples=25, deadline=None)
def test_bernoulli_exact_factor_enumerates_all_label_vectors(f):
    lik = Bernoulli()
    b, c = f.shape
    sig = torch.sigmoid(f)
    expected = torch.zeros(b, c, c, dtype=f.dtype)
    mean_score = torch.zeros(b, c, dtype=f.dtype)
    for bits in itertools.product([0.0, 1.0], repeat=c):
        y = torch.tensor(bits, dtype=f.dtype).expand(b, c)
        prob = (sig**y * (1 - sig) ** (1 - y)).prod(-1)
        s = lik.score(f, y)
        expected += prob[:, None, None] * torch.einsum("bi,bj->bij", s, s)
        mean_score += prob[:, None] * s
    torch.testing.assert_close(outer_sum(lik.exact_vectors(f)), expected, rtol=1e-10, atol=1e-12)
    assert mean_score.abs().max() < 1e-12


@given(logits)
@settings(max_examples=10, deadline=None)
def test_gaussian_exact_factor_is_identity_and_samples_have_unit_covariance(f):
    lik = Gaussian()
    b, c = f.shape
    eye = torch.eye(c, dtype=f.dtype).expand(b, c, c)
    torch.testing.assert_close(outer_sum(lik.exact_vectors(f)), eye)
    scores = lik.score(f, lik.sample(f, 20_000, torch.Generator().manual_seed(0)))  # (m, B, C)
    cov = torch.einsum("mbi,mbj->bij", scores, scores) / scores.shape[0]
    assert (cov - eye).abs().max() < 0.06


@given(logits, st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_sampled_vectors_average_to_the_exact_fisher(f, m):
    """E[Σ_j v_j v_jᵀ] with v_j = s(ŷ_j)/√m equals the exact output-space Fisher."""
    lik = Categorical()
    draws = 4000
    total = torch.zeros(f.shape[0], f.shape[1], f.shape[1], dtype=f.dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(draws // m):
        total += outer_sum(lik.sample_vectors(f, lik.uniforms(f, m, gen)))
    approx = total / (draws // m)
    assert (approx - outer_sum(lik.exact_vectors(f))).abs().max() < 0.05


def test_sampling_does_not_depend_on_batch_split():
    f = torch.randn(7, 4, dtype=torch.float64)
    for lik in (Categorical(), Bernoulli(), Gaussian()):
        whole = lik.sample(f, 3, torch.Generator().manual_seed(2))
        gen = torch.Generator().manual_seed(2)
        parts = torch.cat([lik.sample(f[:3], 3, gen), lik.sample(f[3:], 3, gen)], dim=1)
        torch.testing.assert_close(parts, whole, rtol=0, atol=0)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest entrywise relative error (entries of ``want`` that are 0 must be 0)."""
    scale = want.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((got.double() - want).abs() / scale).max())


@pytest.mark.parametrize("margin", [20.0, 30.0, 35.0])
def test_categorical_factor_and_score_keep_float32_precision_for_any_confident_class(margin):
    """Float32 logits with one class ahead by ``margin`` (the smallest p ~ 1e-16 at 35), that
    class at every place: before, the factor reflected onto the last class, and with another
    one dominant its entries cancelled (the output-space Fisher 17% off at 30, the model's
    Fisher 2.4e-2 to 0.14), and the score's entry at a confident label, 1 - p_y, was 0."""
    classes = 4
    for top in range(classes):
        f = torch.linspace(-1.0, 1.0, classes).repeat(3, 1)
        f[:, top] += margin
        f[1] *= 0.5  # (another margin in the second sample)
        p = torch.softmax(f.double(), -1)
        # (the diagonal p_i (1 - p_i) as p_i Σ_{k≠i} p_k: in float64 too, 1 - p_i cancels)
        rest = (p.unsqueeze(-2) * (1 - torch.eye(classes, dtype=p.dtype))).sum(-1)
        want = torch.diag_embed(p * rest) - torch.einsum("bi,bj->bij", p, p) * (
            1 - torch.eye(classes, dtype=p.dtype)
        )
        assert _relative(outer_sum(Categorical().exact_vectors(f)), want) < 1e-4
        label = torch.full((3,), top)
        others = p.clone()
        others[:, top] = 0
        want_score = -others
        want_score[:, top] = others.sum(-1)  # (1 - p_top, in float64 without cancellation)
        assert _relative(Categorical().score(f, label), want_score) < 1e-5


@pytest.mark.parametrize("logit", [-30.0, -20.0, 20.0, 30.0])
def test_bernoulli_factor_and_score_keep_float32_precision_at_saturated_logits(logit):
    """Before, σ(1 - σ) and y - σ lost everything once σ(f) rounded to 1 in float32: the
    Fisher of an output at logit 17 was 36% off, at 20 exactly 0."""
    f = torch.tensor([[logit, 0.5]])
    sig = torch.sigmoid(f.double())
    want = torch.diag_embed(sig * torch.sigmoid(-f.double()))  # (1 - σ cancels in float64 too)
    assert _relative(outer_sum(Bernoulli().exact_vectors(f)), want) < 1e-5
    y = torch.tensor([[1.0, 0.0]])
    want_score = y * torch.sigmoid(-f.double()) - (1 - y) * sig  # (y - σ, without cancellation)
    assert _relative(Bernoulli().score(f, y), want_score) < 1e-5


def test_gaussian_sampled_scores_do_not_round_to_the_outputs_precision():
    """The score of a draw ``f + z`` is ``z``: before, ``(f + z) - f`` in float32 rounded ``z``
    to the precision of ``f`` (outputs of 1e6: the Fisher 1.8% off, 1e7: 17.5%)."""
    f = torch.full((3, 2), 1e7)
    uniforms = Gaussian().uniforms(f, 4, torch.Generator().manual_seed(0))
    got = Gaussian().sample_vectors(f, uniforms)
    want = Gaussian().sample_vectors(torch.zeros(3, 2, dtype=torch.float64), uniforms)
    assert _relative(got, want) < 1e-6


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("method", ["empirical", "batched"])
def test_one_output_unit_takes_targets_without_a_feature_dimension(likelihood, method) -> None:
    """With one output unit, ``(B,)`` targets are ``(B, 1)`` ones (as the docstrings say)."""
    from ewc_reg import fisher_diagonal

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64)
    if likelihood == "bernoulli":
        y = (y > 0).double()
    flat = fisher_diagonal(model, [(x, y)], method, likelihood=likelihood)
    column = fisher_diagonal(model, [(x, y[:, None])], method, likelihood=likelihood)
    torch.testing.assert_close(flat, column, rtol=0, atol=0)
