"""Every estimator against independent references (float64)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ewc_reg import fisher_diagonal
from ewc_reg.likelihoods import Categorical

from .models import cnn, mlp, randomize_bn
from .reference import (
    assert_close_dicts,
    brute_force_batched,
    brute_force_fisher,
    jacrev_ggn_diagonal,
    rel_err,
)

N = 11


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def problem(kind: str, classes: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = mlp(classes=classes), torch.randn(N, 6, dtype=torch.float64)
    else:
        model, x = cnn(classes=classes), torch.randn(N, 2, 6, 6, dtype=torch.float64)
    return model, x


SLICES = {
    "all": None,
    "head": lambda out: out[:, 1:3],
    "gather": lambda out: out[:, [4, 0, 2]],
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("slice_name", list(SLICES))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_matches_brute_force(kind, slice_name, method):
    output_fn = SLICES[slice_name]
    model, x = problem(kind, classes=5)
    c = 5 if output_fn is None else output_fn(torch.zeros(1, 5)).shape[1]
    y = torch.randint(0, c, (N,))
    model.train()
    got = fisher_diagonal(model, batches_of(x, y, 4), method, output_fn=output_fn)
    assert model.training
    want = brute_force_fisher(model, x, y, method, output_fn or (lambda o: o))
    assert_close_dicts(got, want, 1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_is_ggn_diagonal_from_jacrev(kind):
    model, x = problem(kind, classes=4)
    output_fn = SLICES["head"]
    y = torch.zeros(N, dtype=torch.long)
    got = fisher_diagonal(model, batches_of(x, y, 5), "exact", output_fn=output_fn)
    assert_close_dicts(got, jacrev_ggn_diagonal(model, x, output_fn), 1e-10)


@pytest.mark.parametrize("m", [1, 3])
def test_sample_matches_brute_force_on_the_same_draws(m):
    model, x = problem("mlp", classes=5)
    y = torch.zeros(N, dtype=torch.long)
    got = fisher_diagonal(
        model, batches_of(x, y, 4), "sample", mc_samples=m,
        generator=torch.Generator().manual_seed(7),
    )
    model.eval()
    with torch.no_grad():
        draws = Categorical().sample(model(x), m, torch.Generator().manual_seed(7))  # (m, N)
    assert_close_dicts(got, brute_force_fisher(model, x, None, "sample", sampled=draws), 1e-10)


def test_categorical_sampler_follows_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, -30.0]], dtype=torch.float64)
    draws = Categorical().sample(logits, 40_000, torch.Generator().manual_seed(0))
    freq = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(2)]) / 40_000
    assert (freq - torch.softmax(logits, -1)).abs().max() < 0.01
    assert int(draws.max()) < 4


def test_sample_converges_to_exact():
    model, x = problem("mlp", classes=3)
    data = batches_of(x, torch.zeros(N, dtype=torch.long), 6)
    exact = fisher_diagonal(model, data, "exact")
    errors = []
    for m in (4, 64, 1024):
        approx = fisher_diagonal(
            model, data, "sample", mc_samples=m, generator=torch.Generator().manual_seed(1)
        )
        errors.append(max(rel_err(approx[n], exact[n]) for n in exact))
    assert errors[2] < 0.1
    assert errors[2] < errors[0] / 4  # Monte-Carlo error shrinks like 1/sqrt(m)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batched_with_batch_size_one_equals_empirical(kind):
    model, x = problem(kind, classes=4)
    y = torch.randint(0, 4, (N,))
    batched = fisher_diagonal(model, batches_of(x, y, 1), "batched")
    empirical = fisher_diagonal(model, batches_of(x, y, 5), "empirical")
    assert_close_dicts(batched, empirical, 1e-10)


def test_batched_matches_brute_force_with_ragged_last_batch():
    model, x = problem("mlp", classes=5)
    y = torch.randint(0, 2, (N,))
    data = batches_of(x, y, 4)  # 4, 4, 3
    output_fn = SLICES["head"]
    got = fisher_diagonal(model, data, "batched", output_fn=output_fn)
    assert_close_dicts(got, brute_force_batched(model, data, output_fn), 1e-10)


@given(
    batch=st.integers(1, N),
    chunk=st.integers(1, N),
    method=st.sampled_from(["exact", "empirical", "sample"]),
)
@settings(max_examples=15, deadline=None)
def test_invariant_to_loader_batch_size_and_chunk_size(batch, chunk, method):
    model, x = problem("mlp", classes=4)
    y = torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(3))

    def run(b, c):
        return fisher_diagonal(
            model, batches_of(x, y, b), method, chunk_size=c, mc_samples=2,
            generator=torch.Generator().manual_seed(5),
        )

    assert_close_dicts(run(batch, chunk), run(N, None), 1e-10)


def test_n_samples_uses_the_first_n_samples():
    model, x = problem("cnn", classes=3)
    y = torch.randint(0, 3, (N,))
    for method in ("exact", "empirical"):
        got = fisher_diagonal(model, batches_of(x, y, 3), method, n_samples=7)
        assert_close_dicts(got, brute_force_fisher(model, x[:7], y[:7], method), 1e-10)
    # more than available: all of them
    assert_close_dicts(
        fisher_diagonal(model, batches_of(x, y, 3), "exact", n_samples=1000),
        fisher_diagonal(model, batches_of(x, y, 3), "exact"),
        1e-12,
    )


def test_softmax_regression_closed_form():
    """W_ci: mean_n x_ni² p_nc (1 − p_nc); b_c: mean_n p_nc (1 − p_nc)."""
    torch.manual_seed(0)
    model = nn.Linear(7, 4).double()
    x = torch.randn(40, 7, dtype=torch.float64)
    fisher = fisher_diagonal(model, batches_of(x, torch.zeros(40, dtype=torch.long), 16))
    p = torch.softmax(model(x), -1).detach()
    var = p * (1 - p)
    torch.testing.assert_close(fisher["weight"], (var.T @ x.pow(2)) / 40, rtol=1e-12, atol=0)
    torch.testing.assert_close(fisher["bias"], var.mean(0), rtol=1e-12, atol=0)


def test_score_identity_expected_gradient_is_zero():
    """Σ_y p(y|x) g_y = 0 for every sample: exact vectors' mean-weighted sum vanishes."""
    torch.manual_seed(0)
    model, x = problem("mlp", classes=5)
    model.eval()
    params = [p for p in model.parameters()]
    for i in range(3):
        log_probs = torch.log_softmax(model(x[i : i + 1])[0], -1)
        expected = [torch.zeros_like(p) for p in params]
        for c in range(5):
            grads = torch.autograd.grad(log_probs[c], params, retain_graph=True)
            for e, g in zip(expected, grads):
                e += log_probs[c].exp().detach() * g
        for e in expected:
            assert e.abs().max() < 1e-12


def test_gaussian_exact_is_mean_sum_of_squared_output_gradients():
    """Unit-variance Gaussian: F = mean_n Σ_k (∂f_k/∂θ)²."""
    model, x = problem("mlp", classes=3)
    y = torch.randn(N, 3, dtype=torch.float64)
    got = fisher_diagonal(model, batches_of(x, y, 4), "exact", likelihood="gaussian")
    want = jacrev_ggn_diagonal(model, x, output_hessian=lambda f: torch.eye(3, dtype=f.dtype))
    assert_close_dicts(got, want, 1e-10)


def test_bernoulli_exact_is_ggn_with_sigmoid_variance():
    model, x = problem("mlp", classes=3)
    y = torch.randint(0, 2, (N, 3)).double()
    got = fisher_diagonal(model, batches_of(x, y, 4), "exact", likelihood="bernoulli")

    def hessian(f):
        s = torch.sigmoid(f)
        return torch.diag(s * (1 - s))

    assert_close_dicts(got, jacrev_ggn_diagonal(model, x, output_hessian=hessian), 1e-10)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_other_likelihoods_empirical_and_sample(likelihood):
    """Empirical = mean_n (∂ log p(y_n|f_n)/∂θ)², checked with batch-size-1 'batched';
    sample converges to exact."""
    model, x = problem("mlp", classes=2)
    y = torch.randint(0, 2, (N, 2)).double()
    emp = fisher_diagonal(model, batches_of(x, y, 4), "empirical", likelihood=likelihood)
    one = fisher_diagonal(model, batches_of(x, y, 1), "batched", likelihood=likelihood)
    assert_close_dicts(emp, one, 1e-10)
    exact = fisher_diagonal(model, batches_of(x, y, 4), "exact", likelihood=likelihood)
    approx = fisher_diagonal(
        model, batches_of(x, y, 4), "sample", likelihood=likelihood, mc_samples=3000,
        generator=torch.Generator().manual_seed(0),
    )
    assert max(rel_err(approx[n], exact[n]) for n in exact) < 0.1


def test_dict_batches_call_model_with_keywords():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4).double()

        def forward(self, features, scale):
            return self.lin(features) * scale

    model = Keyword()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    data = [{"features": x, "scale": 2.0, "labels": y}]
    got = fisher_diagonal(model, data, "empirical")
    want = brute_force_fisher(nn.Sequential(model.lin), x, y, "empirical", lambda o: o * 2.0)
    assert_close_dicts({k.removeprefix("lin."): v for k, v in got.items()},
                       {k.removeprefix("0."): v for k, v in want.items()}, 1e-10)


def test_extra_tuple_entries_are_ignored_and_frozen_parameters_skipped():
    model, x = problem("mlp", classes=3)
    model[0].weight.requires_grad_(False)
    y = torch.randint(0, 3, (N,))
    got = fisher_diagonal(model, [(x, y, torch.arange(N), "task-0")], "exact")
    assert "0.weight" not in got
    assert not model[0].weight.requires_grad
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


def test_float32_model_gives_float32_fisher_close_to_float64():
    model, x = problem("cnn", classes=3)
    y = torch.randint(0, 3, (N,))
    f64 = fisher_diagonal(model, batches_of(x, y, 4), "exact")
    f32 = fisher_diagonal(model.float(), batches_of(x.float(), y, 4), "exact")
    assert all(t.dtype == torch.float32 for t in f32.values())
    for n in f64:
        assert rel_err(f32[n].double(), f64[n]) < 1e-4


def test_model_state_restored_and_untouched():
    model, x = problem("cnn", classes=3)
    y = torch.randint(0, 3, (N,))
    model.train()
    model[1].eval()  # a submodule deliberately in eval mode stays so
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("exact", "sample", "empirical", "batched"):
        fisher_diagonal(model, batches_of(x, y, 4), method)
    assert model.training and not model[1].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_tables_renormalised_by_max_norm_are_restored(backend):
    """An embedding with ``max_norm`` renormalises the rows it looks up, in place, in every
    forward pass: its table is as before after the Fisher."""
    model = nn.Sequential(
        nn.Embedding(9, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    with torch.no_grad():
        model[0].weight.mul_(3)
    before = model[0].weight.detach().clone()
    x, y = torch.randint(0, 9, (5, 3)), torch.randint(0, 3, (5,))
    fisher_diagonal(model, [(x, y)], backend=backend)
    assert torch.equal(model[0].weight, before)
    model(x)  # (what the restore undoes)
    assert not torch.equal(model[0].weight, before)


class KeepsItsOutput(nn.Module):
    """No rule (the per-module fallback); keeps its last output, as modules that keep attention
    maps or activations for inspection do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sin(self.a * x) + x
        self.last = out.detach()
        return out


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
def test_attributes_set_by_forward_do_not_keep_a_transforms_tensors(backend, tmp_path):
    """Before, an activation kept by ``forward`` run under ``vmap`` (the functorch engine, the
    per-module fallback), and ``spectral_norm``'s ``module.weight``, held a tensor of an ended
    transform afterwards: any use of it, ``pickle`` and ``torch.save(model)`` failed ("Cannot
    access storage of TensorWrapper")."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(4, 4)), KeepsItsOutput(), nn.Linear(4, 3)
    ).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    model(x)
    fisher_diagonal(model, [(x, y)], backend=backend)
    torch.save(model, tmp_path / "model.pt")
    model[1].last + 1, model[0].weight + 1  # (usable: before, "escaped from inside vmap")


class CachedBiases(nn.Module):
    """A stand-in for timm's LeViT-style attention: in eval mode (``caching``), the biases
    ``attention_biases[:, idxs]`` are computed by the first call and cached by device; the
    module owns them next to a layer with parameters (so they are loose: :mod:`.loose`)."""

    def __init__(self, caching: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attention_biases = nn.Parameter(torch.randn(2, 3))
        self.register_buffer("idxs", torch.tensor([0, 2, 1, 2]))
        self.attention_bias_cache: dict[str, torch.Tensor] = {}
        self.caching = caching

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training or not self.caching:
            return self.attention_biases[:, self.idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x) * self.biases(x.device)[0] + self.biases(x.device)[1])


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
@pytest.mark.parametrize("warm", [False, True])
def test_eval_mode_caches_of_parameters_are_bypassed_and_kept(backend, warm):
    """timm's attention modules cache a tensor made from a parameter in eval mode. Warm (an
    evaluation without gradients filled it), it gave that parameter a Fisher of 0; filled
    during the Fisher by the hooks engine's per-sample copies, it made the model fail then and
    after. Bypassed, every engine matches brute force on a model without the cache, and the
    user's cache is as before."""
    torch.manual_seed(0)
    model = nn.Sequential(CachedBiases(), nn.Linear(4, 3)).double().eval()
    plain = nn.Sequential(CachedBiases(caching=False), nn.Linear(4, 3)).double()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    if warm:
        with torch.no_grad():
            model(x)
    cache = model[0].attention_bias_cache
    before = dict(cache)
    got = fisher_diagonal(model, [(x, y)], "exact", backend=backend)
    assert_close_dicts(got, brute_force_fisher(plain, x, y, "exact"), 1e-10)
    assert got["0.attention_biases"].abs().max() > 0
    assert model[0].attention_bias_cache is cache and cache.keys() == before.keys()
    assert all(cache[k] is before[k] for k in cache)
    model(x[:2])  # (the model still runs on another batch size)


class BatchNormTokens(nn.Module):
    """A convolution and a batch norm whose output is used as tokens,
    ``y.flatten(2).transpose(1, 2)``, as in ViT hybrids and XCiT: with one sample, the batch
    norm's output gradient has a batch stride no contiguous or channels-last tensor has. With
    ``by_hand``, the eval-mode batch norm is written out (the reference, which no kernel's bug
    reaches)."""

    def __init__(self, by_hand: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.by_hand = by_hand
        self.register_buffer("mix", torch.randn(4, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W), HW = 4 -> (B, 5)
        z, bn = self.conv(x), self.bn
        if self.by_hand:
            shape = (1, -1, 1, 1)
            scale = (bn.running_var + bn.eps).rsqrt() * bn.weight
            z = (z - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)
        else:
            z = bn(z)
        return self.head((z.flatten(2).transpose(1, 2) * self.mix).sum(1))


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("height", [2, 1])
def test_batch_norm_on_a_dimension_of_size_one_with_a_token_layout(backend, batch_size, height):
    """torch 2.14.1's CPU batch-norm backward is wrong for gradients whose dimension of size 1
    (one sample, or feature maps of height 1) has an odd stride. The loop engine was 3.1 off
    (relative) on this model, and the hooks engine's check of its sums, which compares with
    that loop, rejected the model. Eval-mode batch norm on such inputs is now computed as its
    affine map (``_model_state.batch_norm_backward_fixed``)."""
    torch.manual_seed(0)
    model = BatchNormTokens().double().eval()
    randomize_bn(model)
    by_hand = BatchNormTokens(by_hand=True).double()
    by_hand.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, height, 4 // height, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    got = fisher_diagonal(model, batches_of(x, y, batch_size), "exact", backend=backend)
    assert_close_dicts(got, brute_force_fisher(by_hand, x, y, "exact"), 1e-10)


def test_batch_norm_function_is_put_back_on_success_and_on_error():
    """``F.batch_norm`` is replaced only while a model with a batch norm is consolidated."""
    kernel = torch.nn.functional.batch_norm
    model, x = problem("cnn", classes=3)
    fisher_diagonal(model, [(x, torch.randint(0, 3, (N,)))], "exact")
    assert torch.nn.functional.batch_norm is kernel
    with pytest.raises(ValueError, match="label"):
        fisher_diagonal(model, [(x, torch.full((N,), 7))], "empirical")
    assert torch.nn.functional.batch_norm is kernel


class TiedWithMaxNorm(nn.Module):
    """A language model whose embedding, with ``max_norm``, is tied to its output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 6, max_norm=0.8)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 7)
        return self.head(torch.tanh(self.hidden(self.embedding(ids))))


@pytest.mark.parametrize("method", ["empirical", "exact"])
def test_a_table_with_max_norm_tied_to_the_output_layer(method):
    """The hooks engine's checks of the batch ran the model again on two samples between its
    pass and that pass's backward; the lookup renormalised the table in place again, and the
    backward failed (the tied layer had saved the table: autograd's "modified by an inplace
    operation"). The checks now look up without renormalising: the rows are renormalised
    already."""
    torch.manual_seed(1)
    model = TiedWithMaxNorm().double()
    with torch.no_grad():
        model.embedding.weight.mul_(3)
    ids, labels = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    before = model.embedding.weight.detach().clone()
    got = fisher_diagonal(model, [(ids, labels)], method, backend="hooks")
    assert torch.equal(model.embedding.weight, before)
    want = fisher_diagonal(model, [(ids, labels)], method, backend="loop")
    assert_close_dicts(got, want, 1e-10)


def test_progress_bar_runs(capsys):
    model, x = problem("mlp", classes=3)
    y = torch.randint(0, 3, (N,))
    plain = fisher_diagonal(model, batches_of(x, y, 4), "exact")
    shown = fisher_diagonal(model, batches_of(x, y, 4), "exact", progress=True)
    assert_close_dicts(shown, plain, 0.0)


def test_progress_bar_over_a_loader_without_length():
    """A DataLoader over an IterableDataset has ``__len__``, which raises TypeError: the
    progress bar runs without a total (it raised that TypeError)."""

    model, x = problem("mlp", classes=3)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(x, torch.arange(N) % 3)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)
    plain = fisher_diagonal(model, loader, "empirical")
    shown = fisher_diagonal(model, loader, "empirical", progress=True)
    assert_close_dicts(shown, plain, 0.0)


def test_the_length_of_the_data_is_asked_only_for_a_progress_bar():
    """A stream whose ``__len__`` raises (NotImplementedError, not TypeError) is read without
    a bar, and with one that has no total (the total was computed, and raised, either way)."""
    model, x = problem("mlp", classes=3)
    y = torch.arange(N) % 3

    class Stream:
        asked = 0

        def __iter__(self):
            return iter(batches_of(x, y, 4))

        def __len__(self):
            Stream.asked += 1
            raise NotImplementedError("a stream")

    plain = fisher_diagonal(model, Stream(), "empirical")
    assert Stream.asked == 0
    shown = fisher_diagonal(model, Stream(), "empirical", progress=True)
    assert Stream.asked == 1
    assert_close_dicts(shown, plain, 0.0)


def test_progress_bar_counts_the_batches_of_n_samples(monkeypatch, capsys):
    """With ``n_samples``, the bar's total is the batches that hold them, not the loader's
    length (it showed 3/10 at the end of a call that read 3 batches)."""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # (the plain bar: its text is checked)
    model, x = problem("mlp", classes=3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.arange(N) % 3), batch_size=2
    )
    fisher_diagonal(model, loader, "empirical", n_samples=5, progress=True)
    assert capsys.readouterr().err.split("\r")[-1].strip() == "Fisher: 3/3 batches"
    fisher_diagonal(model, loader, "empirical", progress=True)
    total = len(loader)
    assert capsys.readouterr().err.split("\r")[-1].strip() == f"Fisher: {total}/{total} batches"
    fisher_diagonal(model, list(loader), "empirical", n_samples=5, progress=True)
    assert capsys.readouterr().err.split("\r")[-1].strip() == "Fisher: 3/? batches"


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_parameter_gradient_hooks_are_not_part_of_the_fisher(backend, method):
    """A hook on a parameter's gradient (``p.register_hook``: masking, clipping, scaling,
    logging) is not called during the computation, whatever the engine, and does not scale
    the Fisher (the loop engine and ``batched`` doubled that parameter's sums before, and
    called the hook once per sample and vector); it is still registered after, on success and
    on error."""
    model, x = problem("mlp", classes=3)
    y = torch.arange(N) % 3
    want = fisher_diagonal(model, batches_of(x, y, 4), method, backend=backend)
    calls = []
    weight = model[0].weight
    handle = weight.register_hook(lambda g: calls.append(1) or 2 * g)
    got = fisher_diagonal(model, batches_of(x, y, 4), method, backend=backend)
    assert calls == []
    assert_close_dicts(got, want, 0.0)
    with pytest.raises(ValueError, match="labels"):
        fisher_diagonal(model, [(x, y + 5)], "empirical", backend=backend)
    model.eval()
    (grad,) = torch.autograd.grad(model(x).sum(), weight)
    assert calls == [1]  # (still registered, and on its own)
    handle.remove()
    torch.testing.assert_close(grad, 2 * torch.autograd.grad(model(x).sum(), weight)[0])


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("filled", [False, True])
def test_parametrized_weights_inside_parametrize_cached(backend, filled):
    """Inside ``parametrize.cached()`` (with its cache filled by an evaluation pass without
    gradients, or not) the Fisher of a parametrized weight's parameter is the one without it
    (it was 0: the engines' passes without gradients, or the user's, cached a weight with no
    graph to the parameter); the cache works again after the call."""
    from torch.nn.utils import parametrize

    model, x = problem("mlp", classes=3)
    parametrize.register_parametrization(model[0], "weight", nn.Tanh())
    y = torch.arange(N) % 3
    want = fisher_diagonal(model, batches_of(x, y, 4), "exact", backend=backend)
    with parametrize.cached():
        if filled:
            with torch.no_grad():
                model.eval()(x)
        got = fisher_diagonal(model, batches_of(x, y, 4), "exact", backend=backend)
        assert model[0].weight is model[0].weight  # (cached again)
    assert_close_dicts(got, want, 1e-12)
    assert want["0.parametrizations.weight.original"].abs().max() > 0


GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_called_under_no_grad_or_inference_mode(mode, backend, method):
    """From an evaluation loop, on data made there: the same Fisher, as ordinary tensors."""
    model, x = problem("cnn", classes=4)
    y = torch.randint(0, 4, (N,))
    kwargs = {} if method == "batched" else {"backend": backend}
    want = fisher_diagonal(model, batches_of(x, y, 4), method, **kwargs)
    with GRAD_MODES[mode]():
        data = batches_of(x.clone(), y.clone(), 4)  # inference tensors under inference_mode
        got = fisher_diagonal(model, data, method, **kwargs)
    assert not any(f.is_inference() for f in got.values())
    assert_close_dicts(got, want, 1e-12)
    if method == "exact":
        assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_called_under_autocast_computes_in_the_model_dtype(method):
    """From a mixed-precision training loop: autocast is off inside (in bfloat16 this Fisher
    is 2-5% off), so the Fisher is that of the model's own float32."""
    model, x = problem("cnn", classes=4)
    model, x = model.float(), x.float()
    y = torch.randint(0, 4, (N,))
    want = fisher_diagonal(model, batches_of(x, y, 4), method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(x.flatten(1), x.flatten(1).T).dtype == torch.bfloat16  # (on out here)
        got = fisher_diagonal(model, batches_of(x, y, 4), method)
    assert_close_dicts(got, want, 1e-6)


class Gain(nn.Module):
    """An elementwise gain: no per-layer rule (the hooks engine's per-module fallback)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


@pytest.mark.parametrize("backend", ["auto", "functorch"])
@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_float16_gradients_are_squared_in_float32(backend, scale):
    """The same logits, per-sample gradients of the gain about ``scale`` times those of the
    plain model: before, the functorch engine (and the per-module fallback, which runs it on
    one module) squared them in float16, where they under- (1e-4: a Fisher of 0, relative
    error 1.0) or overflow (1e3: ``FloatingPointError``); now as the loop engine, within
    float16's rounding of a float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), Gain(4))
    with torch.no_grad():
        model[0].weight.mul_(scale), model[0].bias.mul_(scale), model[1].g.fill_(1 / scale)
    model, x = model.half(), torch.randn(6, 5).half()
    want = brute_force_fisher(copy.deepcopy(model).double(), x.double(), None, "exact")
    got = fisher_diagonal(model, [x], backend=backend)
    assert all(f.dtype == torch.float32 for f in got.values())
    for name, f in got.items():
        assert rel_err(f.double(), want[name]) < 2e-2, name


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("backend", ["hooks", "functorch", "loop"])
def test_a_confident_float16_model_has_an_exact_fisher(likelihood, backend):
    """Logit margins of about 18 (Bernoulli logits of about 19): the probabilities of the other
    classes (σ(f)σ(-f)), below float16's 6e-8, were 0, and so was the whole exact Fisher
    (relative error 1.0), though its factor, their root (~1e-4), and the float32 sums hold
    them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(0.05)
        bias = [9.0, -9.0, -9.5] if likelihood == "categorical" else [19.0, -19.0, 19.5]
        model[2].bias.copy_(torch.tensor(bias))
    model, x = model.half(), torch.randn(8, 4).half()
    want = fisher_diagonal(copy.deepcopy(model).double(), [x.double()], likelihood=likelihood)
    got = fisher_diagonal(model, [x], likelihood=likelihood, backend=backend)
    for name, f in got.items():
        assert rel_err(f.double(), want[name]) < 5e-2, name  # (first layer: subnormals)


class BlockTwice(nn.Module):
    """One block registered twice, ``ModuleList([block, block])`` (ALBERT's sharing)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([block, block])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


class ChildUnderTwoNames(nn.Module):
    """A module using the weight of a child registered under two names itself (no rule: the
    per-module fallback, which swaps the parameters of the module alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = self.q = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(nn.functional.linear(x, self.p.weight, self.q.bias)) + self.q(x)


@pytest.mark.parametrize("backend", ["auto", "functorch"])
@pytest.mark.parametrize(
    "make", [BlockTwice, lambda: nn.Sequential(ChildUnderTwoNames(), nn.Linear(4, 3))]
)
def test_a_module_registered_under_two_names_keeps_its_parameters(make, backend):
    """Before, ``torch.func.functional_call``'s weight tying left a plain tensor in place of the
    module's parameters (the optimizer's parameter lost its gradient, a later loop Fisher was
    0; ``functorch``), and ``auto`` failed with "`weight` is not an nn.Parameter" on the second
    model, leaving it so."""
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    before = dict(model.named_parameters(remove_duplicate=False))
    got = fisher_diagonal(model, [(x, y)], backend=backend)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert before.keys() == after.keys()
    assert all(after[n] is p and isinstance(p, nn.Parameter) for n, p in before.items())
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "sample"])
def test_batches_of_inputs_only(backend, method):
    """``exact`` and ``sample`` need no labels: a tensor of inputs, ``(inputs,)`` (as a
    ``DataLoader`` over a ``TensorDataset(inputs)`` yields) or a dict without ``"labels"`` give
    the Fisher of the same batches with labels."""
    model, x = problem("cnn", classes=4)
    y = torch.randint(0, 4, (N,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    forms = {
        "labelled": batches_of(x, y, 4),
        "tensors": [x[i : i + 4] for i in range(0, N, 4)],
        "data loader": loader,
        "dicts": [{"input": x[i : i + 4]} for i in range(0, N, 4)],
    }
    got = {
        form: fisher_diagonal(
            model, data, method, backend=backend, generator=torch.Generator().manual_seed(2)
        )
        for form, data in forms.items()
    }
    for form in forms:
        assert_close_dicts(got[form], got["labelled"], 1e-12)
    assert_close_dicts(
        fisher_diagonal(model, forms["tensors"], method, n_samples=5, backend=backend,
                        generator=torch.Generator().manual_seed(2)),
        fisher_diagonal(model, batches_of(x[:5], y[:5], 4), method, backend=backend,
                        generator=torch.Generator().manual_seed(2)),
        1e-12,
    )


class _Quantizable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.ao import quantization

        self.quant, self.dequant = quantization.QuantStub(), quantization.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


@pytest.mark.filterwarnings("ignore")  # (torch.ao.quantization's deprecation warnings)
@pytest.mark.parametrize("prepared", ["qat", "calibration"])
def test_quantization_observers_change_nothing(prepared):
    """A quantization-aware model's fake-quantize modules, and a calibration model's
    observers, observe in eval mode too: each forward pass of the computation recalibrated
    the model, its Fisher changed from call to call and the call changed its buffers. Now two
    calls give the same Fisher, every buffer is as before, and the engines agree."""
    from torch.ao import quantization

    torch.manual_seed(0)
    model = _Quantizable()
    if prepared == "qat":
        model.train().qconfig = quantization.get_default_qat_qconfig("fbgemm")
        quantization.prepare_qat(model, inplace=True)
    else:
        model.eval().qconfig = quantization.get_default_qconfig("fbgemm")
        quantization.prepare(model, inplace=True)
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    with torch.no_grad():
        model(x)  # (calibrated once, on other data than the Fisher's)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = fisher_diagonal(model, [(3 * x, y)], "exact")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_close_dicts(fisher_diagonal(model, [(3 * x, y)], "exact"), first, 0.0)
    loop = fisher_diagonal(model, [(3 * x, y)], "exact", backend="loop")
    assert_close_dicts(first, loop, 1e-5)
    flags = [m.observer_enabled.item() for m in model.modules() if hasattr(m, "observer_enabled")]
    assert flags == [1] * len(flags)  # (on again after the call)
