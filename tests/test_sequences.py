"""Sequence outputs ``(B, T, V)`` (issue #5, part 4): each estimator against a brute-force
autograd loop over sequences, tokens and labels, on a tiny causal Transformer in float64."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.engines import ENGINES
from ewc_reg.likelihoods import LIKELIHOODS, Categorical

VOCAB, LENGTH, DIM = 4, 5, 8


@dataclass
class LMOutput:
    """Like a Hugging Face model output: the logits under ``.logits``."""

    logits: Tensor


class TinyCausalLM(nn.Module):
    """One pre-norm causal self-attention block, an MLP and a vocabulary head."""

    def __init__(self, as_object: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.3 * torch.randn(LENGTH, DIM))
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.Tanh(), nn.Linear(2 * DIM, DIM))
        self.head = nn.Linear(DIM, VOCAB)
        self.as_object = as_object

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        length = input_ids.shape[-1]
        h = self.tok(input_ids) + self.pos[:length]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM)
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        h = h + self.proj(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
        logits = self.head(h + self.mlp(self.ln2(h)))
        return LMOutput(logits) if self.as_object else logits


def make_model(as_object: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return TinyCausalLM(as_object).double()


def padded_batches(sizes=(3, 2), length: int = LENGTH) -> list[dict[str, Tensor]]:
    """Dict batches with end padding: attention_mask 0 and labels -100 past each length; one
    further label is -100 inside a sequence (a prompt token, say)."""
    g = torch.Generator().manual_seed(5)
    batches = []
    for size in sizes:
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        labels = torch.randint(0, VOCAB, (size, length), generator=g)
        lengths = torch.randint(2, length + 1, (size,), generator=g)
        attention = (torch.arange(length) < lengths[:, None]).long()
        labels = labels.masked_fill(attention == 0, -100)
        labels[0, 0] = -100
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return batches


def zeros_like_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in model.named_parameters()}


def grad_of(scalar: Tensor, model: nn.Module) -> dict[str, Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def sequences(batches):
    """(input_ids (1, T), positions that count, labels (T,)) one sequence at a time."""
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            labels = batch["labels"][i]
            keep = batch["attention_mask"][i].bool() & (labels != -100)
            yield batch["input_ids"][i : i + 1], keep, labels


def log_probs(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return torch.log_softmax(getattr(out, "logits", out)[0], dim=-1)  # (T, V)


def brute_force(model: nn.Module, batches, method: str, draws=None) -> dict[str, Tensor]:
    """exact: Σ_t Σ_c p_tc (∇ log p_t(c))² over kept tokens; empirical: (∇ Σ_t log p_t(y_t))²;
    sample: mean over the given label sequences of (∇ Σ_t log p_t(ŷ_t))²."""
    model.eval()
    total, count = zeros_like_params(model), 0
    for n, (ids, keep, labels) in enumerate(sequences(batches)):
        lp = log_probs(model, ids)
        if method == "exact":
            terms = [
                (lp[t, c].exp().item(), lp[t, c])
                for t in range(lp.shape[0]) if keep[t] for c in range(VOCAB)
            ]
        elif method == "empirical":
            terms = [(1.0, sum(lp[t, labels[t]] for t in range(lp.shape[0]) if keep[t]))]
        else:
            terms = [
                (1.0 / len(draws[n]), sum(lp[t, y[t]] for t in range(lp.shape[0]) if keep[t]))
                for y in draws[n]
            ]
        for weight, ll in terms:
            if isinstance(ll, Tensor):
                for name, g in grad_of(ll, model).items():
                    total[name] += weight * g.pow(2)
        count += 1
    return {n: t / count for n, t in total.items()}


def assert_fisher_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_matches_brute_force(method: str) -> None:
    model, batches = make_model(), padded_batches()
    expected = brute_force(model, batches, method)
    assert_fisher_close(fisher_diagonal(model, batches, method), expected)


class PerTokenLM(nn.Module):
    """Embedding, per-token MLP and head: every parameter in a module called once, per sample
    (so that every engine, the hook engine included, covers it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), nn.Tanh(), nn.LayerNorm(DIM),
            nn.Linear(DIM, VOCAB),
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.net(input_ids)


@pytest.mark.parametrize("backend", list(ENGINES))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_every_engine_matches_brute_force(backend: str, method: str) -> None:
    model, batches = PerTokenLM().double(), padded_batches()
    expected = brute_force(model, batches, method)
    assert_fisher_close(fisher_diagonal(model, batches, method, backend=backend), expected)


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_hooks_engine_chunks_match_brute_force(method: str) -> None:
    """Chunks of 2 of the batch of 3 make their own vectors: their labels, padding and
    attention masks are the chunk's rows."""
    model, batches = PerTokenLM().double(), padded_batches()
    expected = brute_force(model, batches, method)
    actual = fisher_diagonal(model, batches, method, backend="hooks", chunk_size=2)
    assert_fisher_close(actual, expected)


def test_exact_within_a_tiny_budget_matches_brute_force() -> None:
    """One sequence's T*V pull-backs exceed the budget: they are taken one at a time."""
    model, batches = make_model(), padded_batches()
    expected = brute_force(model, batches, "exact")
    actual = fisher_diagonal(model, batches, "exact", memory_budget=1, backend="functorch")
    assert_fisher_close(actual, expected)


def test_per_token_expansion_is_the_fisher_of_the_sequence() -> None:
    """Σ_y p(y) (∇ log p(y))² over all V^T label sequences equals the per-token exact Fisher."""
    model, length = make_model(), 3
    ids = torch.randint(0, VOCAB, (2, length))
    total = zeros_like_params(model)
    for i in range(ids.shape[0]):
        lp = log_probs(model.eval(), ids[i : i + 1])
        for y in itertools.product(range(VOCAB), repeat=length):
            ll = sum(lp[t, y[t]] for t in range(length))
            for name, g in grad_of(ll, model).items():
                total[name] += ll.exp().item() * g.pow(2)
    expected = {n: t / ids.shape[0] for n, t in total.items()}
    data = [(ids, torch.zeros_like(ids))]
    assert_fisher_close(fisher_diagonal(model, data, "exact"), expected)


def test_sample_matches_brute_force_and_is_split_invariant() -> None:
    model, batches, m = make_model(), padded_batches(), 3
    # Inverse-CDF draws from uniforms taken row-major over (sequence, draw, position).
    uniforms = torch.rand((5, m, LENGTH), generator=torch.Generator().manual_seed(9),
                          dtype=torch.float64)
    draws = []
    for n, (ids, _, _) in enumerate(sequences(batches)):
        with torch.no_grad():
            cdf = log_probs(model.eval(), ids).exp().cumsum(-1)  # (T, V)
        draws.append([
            [min(int((cdf[t] <= uniforms[n, j, t] * cdf[t, -1]).sum()), VOCAB - 1)
             for t in range(LENGTH)]
            for j in range(m)
        ])
    expected = brute_force(model, batches, "sample", draws)
    gen = torch.Generator().manual_seed(9)
    assert_fisher_close(fisher_diagonal(model, batches, "sample", mc_samples=m, generator=gen),
                        expected)
    singles = [
        {k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))
    ]
    gen = torch.Generator().manual_seed(9)
    assert_fisher_close(fisher_diagonal(model, singles, "sample", mc_samples=m, generator=gen),
                        expected)


def test_batched_matches_brute_force() -> None:
    model, batches = make_model(), padded_batches()
    expected, count = zeros_like_params(model.eval()), 0
    for batch in batches:
        lls = [
            sum(lp[t, labels[t]] for t in range(LENGTH) if keep[t])
            for lp, (_, keep, labels) in (
                (log_probs(model, ids), (ids, keep, labels))
                for ids, keep, labels in sequences([batch])
            )
        ]
        for name, g in grad_of(torch.stack(lls).mean(), model).items():
            expected[name] += g.pow(2)
        count += 1
    expected = {n: t / count for n, t in expected.items()}
    assert_fisher_close(fisher_diagonal(model, batches, "batched"), expected)


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_padding_contributes_nothing(method: str) -> None:
    """A padded batch gives the Fisher of its unpadded sequences (the model is causal)."""
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    labels = torch.randint(0, VOCAB, (2, LENGTH))
    short = 3
    padded = labels.clone()
    padded[1, short:] = -100
    attention = torch.ones_like(ids)
    attention[1, short:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": padded}
    plain = [(ids[:1], labels[:1]), (ids[1:, :short], labels[1:, :short])]
    data = [batch]
    if method == "batched":  # one sequence per batch, as in ``plain``, so that the means agree
        data = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    assert_fisher_close(fisher_diagonal(model, data, method), fisher_diagonal(model, plain, method))


@pytest.mark.parametrize("method", ["exact", "sample", "empirical"])
@pytest.mark.parametrize("padding", [-1, VOCAB])
def test_padding_labels_other_than_the_ignore_index_are_errors(method: str, padding: int) -> None:
    """Every method reads per-position labels (``exact`` and ``sample`` for the positions they
    mark): a padding label other than -100 is out of range, not a position that counts (it
    counted for ``exact`` and ``sample``: 12.48 against 7.83 with -100 in the audit's case)."""
    model = make_model()
    labels = torch.randint(0, VOCAB, (2, LENGTH))
    labels[1, 3:] = padding
    with pytest.raises(ValueError, match=rf"target label {padding} is outside .* or -100 to"):
        fisher_diagonal(model, [(torch.randint(0, VOCAB, (2, LENGTH)), labels)], method)


@pytest.mark.parametrize("method", ["exact", "sample", "empirical", "batched"])
@pytest.mark.parametrize("labels", ["unshifted", "float", "trailing", "soft"])
def test_labels_with_positions_not_aligned_with_the_output_are_errors(
    method: str, labels: str
) -> None:
    """Labels with at least the positions' dimensions but not integers of their shape (left
    unshifted beside a shifted output, float, ``(B, T, 1)``, soft ``(B, T, C)``) are a
    ValueError for every method: ``exact`` and ``sample`` ignored them and their -100, and
    counted the padding (``(B, T, 1)`` labels: 0.71 off for ``exact``)."""
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    y = ids.clone()
    y[:, 3:] = -100
    shift = None
    if labels == "unshifted":
        shift = lambda out: out[:, :-1]  # noqa: E731
    elif labels == "float":
        y = y.double()
    elif labels == "trailing":
        y = y[..., None]
    else:
        y = torch.softmax(torch.randn(2, LENGTH, VOCAB), -1)
    with pytest.raises(ValueError, match=r"labels with positions must be integer class indices"):
        fisher_diagonal(model, [(ids, y)], method, output_fn=shift)


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_labels_of_an_unsigned_dtype_count_every_class(method: str) -> None:
    """In ``uint8`` -100 is 156: class 156 of a larger vocabulary was left out as if it were
    the ignore index. Any integer dtype gives the Fisher of the same labels in int64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(160, 3), nn.Linear(3, 160)).double()
    ids = torch.randint(0, 160, (2, 3))
    y = torch.tensor([[156, 3, 156], [7, 156, 159]])
    want = fisher_diagonal(model, [(ids, y)], method)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert_fisher_close(fisher_diagonal(model, [(ids, y.to(dtype))], method), want)


def test_ignore_index_alone_masks_tuple_batches() -> None:
    model = make_model()
    batches = padded_batches()
    as_tuples = [(b["input_ids"], b["labels"]) for b in batches]
    no_attention = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches]
    expected = fisher_diagonal(model, batches, "empirical")
    assert_fisher_close(fisher_diagonal(model, as_tuples, "empirical"), expected)
    assert_fisher_close(fisher_diagonal(model, no_attention, "empirical"), expected)


def test_logits_attribute_is_used_by_default() -> None:
    batches = padded_batches()
    for method in ("exact", "empirical", "batched"):
        assert_fisher_close(
            fisher_diagonal(make_model(as_object=True), batches, method),
            fisher_diagonal(make_model(), batches, method),
        )


def test_exact_is_limited_to_small_outputs() -> None:
    model, batches = make_model(), padded_batches()
    with pytest.raises(ValueError, match=r"K = \|S\|\*C = 20 .*'sample'.*'empirical'"):
        fisher_diagonal(model, batches, "exact", max_exact_vectors=19)
    fisher_diagonal(model, batches, "exact", max_exact_vectors=20)
    flat = [(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))]
    fisher_diagonal(nn.Linear(3, 30).double(), flat, "exact", max_exact_vectors=1)  # (B, C)


def test_shifted_outputs_keep_the_models_mask_and_count_the_labels() -> None:
    """Outputs shifted by ``output_fn`` (next-token logits of a causal LM): the attention mask
    ``(B, T)`` stays the model's, and the ``-100`` labels ``(B, T - 1)`` leave positions out
    (before, a ValueError told users to shift the mask, and the shifted mask went to the
    model as well: the Fisher of other logits)."""
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    attention = torch.ones_like(ids)
    attention[1, 3:] = 0
    labels = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    shifted = {"output_fn": lambda out: out[:, :-1]}
    with_mask = [{"input_ids": ids, "attention_mask": attention, "labels": labels}]
    without = [{"input_ids": ids, "labels": labels}]
    for method in ("exact", "empirical", "batched"):
        assert_fisher_close(
            fisher_diagonal(model, with_mask, method, **shifted),
            fisher_diagonal(model, without, method, **shifted),
        )
    with pytest.raises(ValueError, match=r"model's input mask.*-100 where a position is left"):
        fisher_diagonal(model, [{"input_ids": ids, "attention_mask": attention}], **shifted)


def test_misaligned_attention_mask() -> None:
    model, batch = make_model(), padded_batches()[0]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        fisher_diagonal(model, [batch], output_fn=lambda out: out[:, :-1])


class TinySeq2Seq(nn.Module):
    """An encoder-decoder in Hugging Face's calling convention: ``attention_mask`` masks the
    encoder's input ``(B, S)``; the logits ``(B, T, V)`` follow ``decoder_input_ids``; with
    ``flagged``, ``config.is_encoder_decoder`` says so (then the decoder's inputs may come
    from elsewhere: here the encoder's, shifted)."""

    def __init__(self, flagged: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.encode, self.head = nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)
        self.config = type("Config", (), {"is_encoder_decoder": True})() if flagged else None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        if decoder_input_ids is None:
            decoder_input_ids = input_ids.roll(1, 1)
        weights = attention_mask.unsqueeze(-1).to(self.tok.weight.dtype)
        memory = (torch.tanh(self.encode(self.tok(input_ids))) * weights).sum(1, keepdim=True)
        return self.head(self.tok(decoder_input_ids) + memory)


@pytest.mark.parametrize("flagged", [False, True])
def test_attention_mask_of_an_encoder_decoder_masks_only_the_encoder(flagged: bool) -> None:
    """In an encoder-decoder batch ``attention_mask`` masks the encoder's input: it was taken
    for the output's mask, a ValueError when the lengths differ and, when they are equal,
    decoder positions silently left out. ``decoder_attention_mask`` masks the output."""
    torch.manual_seed(0)
    model = TinySeq2Seq(flagged).double()
    ids, labels = torch.randint(0, VOCAB, (3, 4)), torch.randint(0, VOCAB, (3, 4))
    encoder_mask = torch.ones_like(ids)
    encoder_mask[0, 2:] = 0
    batch = {"input_ids": ids, "attention_mask": encoder_mask, "labels": labels}
    if not flagged:
        batch["decoder_input_ids"] = ids.roll(1, 1)

    class Unmasked(nn.Module):  # (the encoder mask passed under another name: no output mask)
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Tensor, encoder_mask: Tensor, **rest: Tensor) -> Tensor:
            return self.inner(input_ids, encoder_mask, **rest)

    renamed = {("encoder_mask" if k == "attention_mask" else k): v for k, v in batch.items()}
    for method in ("empirical", "exact", "batched"):
        want = fisher_diagonal(Unmasked(), [renamed], method)
        got = fisher_diagonal(model, [batch], method)
        assert_fisher_close({f"inner.{k}": v for k, v in got.items()}, want)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[1, 1:] = 0
    masked = fisher_diagonal(model, [{**batch, "decoder_attention_mask": decoder_mask}])
    ignored_labels = labels.masked_fill(decoder_mask == 0, -100)
    ignored = fisher_diagonal(model, [{**batch, "labels": ignored_labels}])
    assert_fisher_close(masked, ignored)
    longer = {**batch, "labels": torch.randint(0, VOCAB, (3, 5))}
    longer["decoder_input_ids"] = longer["labels"]  # (T = 5 decoder positions, S = 4)
    fisher_diagonal(model, [longer], "empirical")


class LabelledSeq2Seq(TinySeq2Seq):
    """:class:`TinySeq2Seq` (flagged) with Hugging Face's way of making the decoder's inputs
    from the labels: shifted right, a start token first, -100 made padding (0)."""

    def __init__(self) -> None:
        super().__init__(flagged=True)

    @classmethod
    def can_generate(cls) -> bool:  # (a language model's head: not a classifier's)
        return True

    def prepare_decoder_input_ids_from_labels(self, labels: Tensor) -> Tensor:
        shifted = labels.roll(1, 1)
        shifted[:, 0] = 1
        return shifted.masked_fill(shifted == -100, 0)


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_a_seq2seq_batch_with_labels_only_feeds_the_decoder_from_the_labels(method: str) -> None:
    """A batch ``{input_ids, attention_mask, labels}`` without decoder inputs (a seq2seq
    collator's without a model): the decoder gets the inputs the model's training makes from
    the labels (``prepare_decoder_input_ids_from_labels``), not the ones it makes without them
    (here, as BART does, from the source: 4.95 off, relative, in the report's case)."""
    torch.manual_seed(0)
    model = LabelledSeq2Seq().double()
    ids, labels = torch.randint(0, VOCAB, (3, 4)), torch.randint(0, VOCAB, (3, 4))
    labels[2, 3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    decoder = model.prepare_decoder_input_ids_from_labels(labels)
    want = fisher_diagonal(model, [{**batch, "decoder_input_ids": decoder}], method)
    assert_fisher_close(fisher_diagonal(model, [batch], method), want)


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_seq2seq_batch_with_its_own_decoder_inputs_keeps_them(method: str) -> None:
    """Decoder inputs the batch brings are the model's, not replaced by those made from the
    labels (the same Fisher as through a wrapper that is not taken for an encoder-decoder)."""
    torch.manual_seed(0)
    model = LabelledSeq2Seq().double()
    ids, labels = torch.randint(0, VOCAB, (3, 4)), torch.randint(0, VOCAB, (3, 4))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": torch.randint(0, VOCAB, (3, 4)),
        "labels": labels,
    }

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **inputs: Tensor) -> Tensor:
            return self.inner(**inputs)

    want = fisher_diagonal(Plain(), [batch], method)
    got = fisher_diagonal(model, [batch], method)
    assert_fisher_close({f"inner.{k}": v for k, v in got.items()}, want)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("method", ["exact", "empirical", "sample", "batched"])
def test_elementwise_likelihoods_sum_over_positions(likelihood: str, method: str) -> None:
    """Gaussian/Bernoulli outputs (B, T, C) are (B, T*C) independent outputs."""
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(4, LENGTH, 3, dtype=torch.float64)
    y = torch.rand(4, LENGTH, 2, dtype=torch.float64).round()
    kw = {"likelihood": likelihood, "method": method, "mc_samples": 2}
    structured = fisher_diagonal(model, [(x, y)], generator=torch.Generator().manual_seed(1), **kw)
    flat = fisher_diagonal(
        model, [(x, y.flatten(1))], output_fn=lambda out: out.flatten(1),
        generator=torch.Generator().manual_seed(1), **kw,
    )
    assert_fisher_close(structured, flat)


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 3, 2), (3, 1, 5)])
def test_exact_factor_is_block_diagonal_over_positions(name: str, shape: tuple) -> None:
    """Σ_k v_k v_kᵀ over the flattened per-sample output is, block by block, each position's own
    output-space Fisher (that of the (B', C) output made of that position alone)."""
    lik = LIKELIHOODS[name]()
    f = torch.randn(shape, dtype=torch.float64)
    batch, classes = shape[0], shape[-1]
    flat = lik.exact_vectors(f).reshape(-1, batch, f[0].numel())  # (K, B, |S| C)
    fisher = torch.einsum("kbi,kbj->bij", flat, flat)
    positions = f.reshape(batch, -1, classes)
    expected = torch.zeros_like(fisher)
    for s in range(positions.shape[1]):
        v = lik.exact_vectors(positions[:, s])  # (C, B, C)
        block = slice(s * classes, (s + 1) * classes)
        expected[:, block, block] = torch.einsum("kbi,kbj->bij", v, v)
    torch.testing.assert_close(fisher, expected, rtol=1e-12, atol=1e-14)


def test_likelihood_shapes_and_unchanged_2d_errors() -> None:
    lik = Categorical()
    f = torch.randn(2, 3, 4, dtype=torch.float64)
    assert lik.exact_vectors(f).shape == (9, 2, 3, 4)  # 3 positions x (C - 1) classes
    assert lik.sample(f, 5, None).shape == (5, 2, 3)
    with pytest.raises(ValueError, match=r"must have shape \(B, C\) = \(2, C\)"):
        lik.check_output(torch.randn(2), 2)
    with pytest.raises(ValueError, match="outside the C=4 classes"):
        lik.check_targets(torch.randn(2, 4), torch.tensor([0, -100]))


def test_consolidate_on_sequences() -> None:
    model, batches = make_model(), padded_batches()
    reg = EWCRegularizer(model, strength=1.0, method="sample", mc_samples=2)
    fisher = reg.consolidate(batches, generator=torch.Generator().manual_seed(0))
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert reg.penalty().item() == 0.0


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_dicts_without_labels_are_masked_by_the_attention_mask(method: str) -> None:
    """Without labels only ``attention_mask`` leaves positions out: the same Fisher as with
    labels that are -100 exactly where the mask is 0."""
    model = make_model()
    labelled = padded_batches()
    for batch in labelled:
        batch["labels"][0, 0] = 1  # (only the padding is -100 now)
    unlabelled = [{k: v for k, v in batch.items() if k != "labels"} for batch in labelled]
    got, want = (
        fisher_diagonal(model, data, method, generator=torch.Generator().manual_seed(4))
        for data in (unlabelled, labelled)
    )
    assert_fisher_close(got, want)


def test_a_labels_only_batch_for_hugging_faces_bart_and_t5() -> None:
    """The same with Hugging Face's BART (which fed its decoder the shifted source, silently)
    and T5 (which failed): as if the batch had the decoder inputs its training makes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bart = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=16, pad_token_id=1,
        decoder_start_token_id=2,
    )
    t5 = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )
    for model in (
        transformers.BartForConditionalGeneration(bart),
        transformers.T5ForConditionalGeneration(t5),
    ):
        model = model.double()
        ids, labels = torch.randint(3, 40, (3, 5)), torch.randint(3, 40, (3, 5))
        labels[0, 4] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        decoder = model.prepare_decoder_input_ids_from_labels(labels=labels)
        want = fisher_diagonal(model, [{**batch, "decoder_input_ids": decoder}], "empirical")
        assert_fisher_close(fisher_diagonal(model, [batch], "empirical"), want)
