"""The hook engine's ``nn.MultiheadAttention`` rule, against the functorch engine and a
brute-force autograd loop (float64, 1e-10 relative): self-attention and distinct inputs, masks,
attention weights, bias on/off, separate projection weights, parameter subsets, chunks; and the
modules the rule declines, which go through the per-module fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from ewc_reg import fisher_diagonal
from ewc_reg.engines import attention
from ewc_reg.engines.functorch import FunctorchEngine
from ewc_reg.engines.hooks import HookEngine
from ewc_reg.engines.recording import plan

from .reference import assert_close_dicts, brute_force_fisher
from .test_hooks_engine import (
    brute_force,
    check_against_references,
    engine_sums,
    random_vectors,
    trainable,
)

E, L, S = 8, 4, 5  # embedding, query and key positions


class Attend(nn.Module):
    """``x: (B, S, E)`` to 3 outputs through one ``nn.MultiheadAttention`` called as ``mode``
    says; masks are built from ``x`` inside ``forward`` (per sample, never a fully masked row).
    With ``batch_first=False`` the attention's inputs and output are transposed around it."""

    def __init__(self, mode: str, heads: int = 2, batch_first: bool = True, **options) -> None:
        super().__init__()
        self.mode = mode
        self.attn = nn.MultiheadAttention(E, heads, batch_first=batch_first, **options)
        self.mix = nn.Linear(E, self.attn.kdim)  # gives distinct key and value inputs
        self.head = nn.Linear(E, 3)

    def padding(self, x: Tensor, as_float: bool = False) -> Tensor:
        masked = x[..., 0] > 0.3
        masked[:, 0] = False  # (B, S)
        return torch.where(masked, -1e9, 0.0).to(x.dtype) if as_float else masked

    def forward(self, x: Tensor) -> Tensor:
        mode, kw = self.mode, {}
        q = k = v = x
        if mode == "distinct":  # query, key and value all different, L != S
            # (the scaling keeps the key bias from cancelling in the softmax)
            q, k, v = x[:, :L], self.mix(x) * x[..., :1], torch.tanh(x[..., : self.attn.vdim])
        elif mode == "cross":  # key is value, query different
            q, k, v = x[:, :L] * 2, x, x
        elif mode in ("padding", "padding_weights"):
            kw = {"key_padding_mask": self.padding(x)}
        elif mode == "padding_float":
            kw = {"key_padding_mask": self.padding(x, as_float=True)}
        elif mode in ("causal", "causal_weights", "causal_padding"):
            kw = {"attn_mask": torch.ones(S, S, dtype=torch.bool).triu(1), "is_causal": True}
            if mode == "causal_padding":
                kw["key_padding_mask"] = self.padding(x)
        elif mode == "float_mask":
            kw = {"attn_mask": torch.linspace(-1.0, 1.0, S * S, dtype=x.dtype).view(S, S)}
        elif mode == "per_sample_mask":  # 3-d (B * heads, L, S) with one head: per sample
            keys = self.padding(x)[:, None, :].expand(-1, S, -1)
            kw = {"attn_mask": keys & ~torch.eye(S, dtype=torch.bool)}
        weights = mode.endswith("weights") or mode.startswith("weights")
        first = self.attn.batch_first
        if not first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, w = self.attn(
            q, k, v, need_weights=weights, average_attn_weights=mode != "weights_per_head", **kw
        )
        if not first:
            out, q, k, v = (t.transpose(0, 1) for t in (out, q, k, v))
        h = out.mean(1)
        if w is not None:  # the weights get gradients too
            w = w.mean(1) if w.dim() == 4 else w
            h = h + (w[..., : v.shape[1]] @ v).mean(1)  # (add_bias_kv: one key more)
        return self.head(h)


CASES = {
    "self": ("self", {}),
    "self_no_bias": ("self", {"bias": False}),
    "distinct": ("distinct", {}),
    "cross": ("cross", {}),
    "kdim_vdim": ("distinct", {"kdim": 6, "vdim": 3}),
    "weights": ("weights", {}),
    "weights_per_head": ("weights_per_head", {}),
    "padding": ("padding", {}),
    "padding_float": ("padding_float", {}),
    "padding_weights": ("padding_weights", {}),
    "causal": ("causal", {}),
    "causal_weights": ("causal_weights", {}),
    "causal_padding": ("causal_padding", {}),
    "float_mask": ("float_mask", {}),
    "per_sample_mask": ("per_sample_mask", {"heads": 1}),
    "one_head": ("self", {"heads": 1}),
}


def attend(name: str, batch_first: bool = True) -> Attend:
    mode, options = CASES[name]
    return Attend(mode, batch_first=batch_first, **options).double().eval()


def data(batch: int = 5) -> Tensor:
    return torch.randn(batch, S, E, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_references(name: str, engine_ways: str) -> None:
    model = attend(name)
    assert plan(model, trainable(model))[0].rule is attention.multihead_attention
    check_against_references(model, data())


@pytest.mark.parametrize(
    "name",
    ["self", "distinct", "kdim_vdim", "padding_weights", "weights_per_head", "causal_padding",
     "per_sample_mask"],
)
def test_sequence_first_attention(name: str, engine_ways: str) -> None:
    """``batch_first=False`` (PyTorch's default): ``(L, B, E)`` in and out, taken batch first
    by the recorded forward; the masks and weights lead with the batch either way. (Before,
    the model went to the functorch engine.)"""
    model = attend(name, batch_first=False)
    assert plan(model, trainable(model))[0].rule is attention.multihead_attention
    check_against_references(model, data())


@pytest.mark.parametrize("name", ["self", "distinct", "padding_weights", "causal_padding"])
@pytest.mark.parametrize("chunks", [{"chunk_size": 2}, {"memory_budget": 1}])
def test_chunks(name: str, chunks: dict, engine_ways: str) -> None:
    """Engine chunks (``chunk_size``) and rule chunks of one sample (``memory_budget=1``)."""
    check_against_references(attend(name), data(7), **chunks)


@pytest.mark.parametrize(
    "selected",
    [
        ["attn.in_proj_weight"],
        ["attn.out_proj.weight"],
        ["attn.in_proj_bias", "attn.out_proj.bias", "head.weight"],
        ["attn.k_proj_weight", "attn.v_proj_weight"],
    ],
)
def test_parameter_subsets(selected: list[str]) -> None:
    model = attend("kdim_vdim" if "attn.k_proj_weight" in selected else "padding_weights")
    for name, p in model.named_parameters():
        p.requires_grad_(name in selected)
    units = plan(model, trainable(model))
    attn = next(unit for unit in units if unit.path == "attn")
    assert attn.rule is attention.multihead_attention
    assert sorted(attn.names.values()) == sorted(n for n in selected if n.startswith("attn."))
    check_against_references(model, data())
    x = data()
    names = sorted(selected)
    got = fisher_diagonal(model, [(x, torch.randint(0, 3, (5,)))], params=names, backend="hooks")
    want = fisher_diagonal(
        model, [(x, torch.randint(0, 3, (5,)))], params=names, backend="functorch"
    )
    assert list(got) == names
    assert_close_dicts(got, want, 1e-10)


class Encoder(nn.Module):
    """Embedding and two ``nn.TransformerEncoderLayer`` (post-norm and pre-norm) with a
    per-sample padding mask and a causal mask, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, E)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(E, 2, 16, dropout=0.1, batch_first=True),
                nn.TransformerEncoderLayer(E, 4, 16, dropout=0.1, batch_first=True,
                                           norm_first=True),
            ]
        )
        self.head = nn.Linear(E, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == 0
        padding[:, 0] = False
        h = self.embed(tokens)
        h = self.layers[0](h, src_key_padding_mask=padding)
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=h.dtype)
        h = self.layers[1](h, src_mask=causal, is_causal=True)
        return self.head(h.mean(1))


@pytest.mark.filterwarnings("ignore:.*mask")
@pytest.mark.parametrize("chunks", [{}, {"chunk_size": 3}, {"memory_budget": 1}])
def test_inside_transformer_encoder_layers(chunks: dict) -> None:
    model = Encoder().double().eval()
    tokens = torch.randint(0, 11, (6, 7))
    tokens[:, 3] = 0  # some padding in every sample
    check_against_references(model, tokens, **chunks)


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_declined_modules_use_the_fallback(options: dict) -> None:
    model = Attend("padding_weights", **options).double().eval()
    assert plan(model, trainable(model))[0].rule is None
    check_against_references(model, data(), via_rules=False)


def test_training_mode_with_dropout_and_unbatched_inputs_are_not_redone() -> None:
    """The recorded forward leaves these calls to the module (and keeps nothing), and the rule
    then declines them; in eval mode it computes the module's output and keeps its pieces."""
    mha = nn.MultiheadAttention(E, 2, dropout=0.5, batch_first=True).double()
    x = data(2)
    kept: dict[str, Tensor] = {}

    def keep(name: str, piece: Tensor, pull_back: bool) -> Tensor:
        kept[name] = piece
        return piece

    assert attention.attention_in_pieces(mha, (x, x, x), {}, keep) is NotImplemented
    mha.eval()
    assert attention.attention_in_pieces(mha, (x[0], x[0], x[0]), {}, keep) is NotImplemented
    assert not kept
    grads = {"y": torch.randn(3, 2, S, E, dtype=torch.float64)}
    names = ["in_proj_weight"]
    assert attention.multihead_attention(mha, (x, x, x), {}, grads, kept, names, 2**20) is None
    y, weights = attention.attention_in_pieces(mha, (x, x, x), {}, keep)
    want_y, want_weights = mha(x, x, x)
    assert torch.allclose(y, want_y, atol=1e-12) and torch.allclose(weights, want_weights)
    assert set(kept) == {"x", "qkv", "o", "y"} and kept["y"] is y
    assert attention.multihead_attention(mha, (x, x, x), {}, grads, kept, names, 2**20) is not None


def test_only_the_weights_output_used() -> None:
    """``G`` only for the attention weights (the main output unused)."""

    class WeightsOnly(Attend):
        def forward(self, x: Tensor) -> Tensor:
            _, w = self.attn(x, x, x, key_padding_mask=self.padding(x))
            return self.head(w @ x).mean(1)

    model = WeightsOnly("self").double().eval()
    x = data()
    vectors = random_vectors(model, x)
    got = engine_sums(HookEngine(), model, x, vectors)
    assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors), 1e-10)
    assert_close_dicts(got, brute_force(model, x, vectors), 1e-10)


def test_the_forward_in_pieces_is_undone_after_success_and_error() -> None:
    """The module's own ``forward`` is back after the engine ran, and a module with a forward
    set on the instance gets no rule (it may compute something else)."""
    model = Attend("padding").double().eval()
    x = data()
    engine_sums(HookEngine(), model, x, random_vectors(model, x))
    assert "forward" not in vars(model.attn)

    def broken(out: Tensor) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        engine_sums(HookEngine(), model, x, None, output_fn=broken)
    assert "forward" not in vars(model.attn)
    model.attn.forward = model.attn.forward  # (the bound method, now an instance attribute)
    assert plan(model, trainable(model))[0].rule is None
    check_against_references(model, x, via_rules=False)


def test_forward_called_directly_goes_to_functorch(caplog) -> None:
    """``attn.forward(...)`` bypasses the hooks: its parameters are used outside a recorded call,
    and the model goes to the functorch engine (the pieces are not kept)."""

    class Direct(Attend):
        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.attn.forward(x, x, x, need_weights=False)[0].mean(1))

    model = Direct("self").double().eval()
    x = data()
    data_ = [(x, torch.randint(0, 3, (x.shape[0],)))]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data_)
    assert any("used outside" in r.getMessage() for r in caplog.records if r.name == "ewc_reg")
    assert_close_dicts(got, fisher_diagonal(model, data_, backend="functorch"), 1e-12)


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` (batch first): self-attention, causal self-attention and
    cross-attention (the decoder's keys and values are the encoder's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.source, self.target = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        causal = self.transformer.generate_square_subsequent_mask(target.shape[1])
        hidden = self.transformer(self.source(source), self.target(target), tgt_mask=causal)
        return self.head(hidden).mean(1)


def test_encoder_decoder_transformer(caplog) -> None:
    torch.manual_seed(0)
    model = EncoderDecoder().double().eval()
    batch = {
        "source": torch.randint(0, 20, (4, 6)),
        "target": torch.randint(0, 20, (4, 3)),
        "labels": torch.randint(0, 3, (4,)),
    }
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [batch])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, fisher_diagonal(model, [batch], backend="functorch"), 1e-10)


class PaddedEncoder(nn.Module):
    """Token ids (0 pads) through an ``nn.TransformerEncoder`` (nested tensors on, the default)
    with their padding mask, mean-pooled over all positions, the padded ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 6)
        layer = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, 3)
        hidden = self.encoder(self.embedding(ids), src_key_padding_mask=ids == 0)
        return self.head(hidden.mean(1))


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_the_pass_without_gradients_is_the_function_differentiated(backend) -> None:
    """In eval mode without gradients the encoder's fast path gives zeros at padded positions;
    with gradients they are computed. The loop and functorch engines made their vectors from
    the former and pulled them back through the latter (2e-2 relative error here); the fast path
    is off while the Fisher is computed, and as before after it."""
    torch.manual_seed(0)
    model = PaddedEncoder().double().eval()
    ids = torch.randint(1, 7, (4, 5))
    ids[1, 3:] = ids[2, 4] = 0
    y = torch.randint(0, 3, (4,))
    with torch.no_grad():
        fused = model(ids)
    assert (fused - model(ids)).abs().max() > 1e-3  # (the two paths differ)
    got = fisher_diagonal(model, [(ids, y)], "exact", backend=backend)
    assert_close_dicts(got, brute_force_fisher(model, ids, y, "exact"), 1e-10)
    assert torch.backends.mha.get_fastpath_enabled()


class AlongRows(nn.Module):
    """Axial attention: ``x: (B, H, S, E)``, each sample a grid of ``H`` rows, :class:`Attend`
    on the rows folded into the batch dimension, ``(B H, S, E)``, its outputs averaged over
    each sample's rows."""

    def __init__(self, name: str, batch_first: bool = True) -> None:
        super().__init__()
        self.rows = attend(name, batch_first)

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x.flatten(0, 1)).unflatten(0, x.shape[:2]).mean(1)


@pytest.mark.parametrize(
    "name", ["self", "distinct", "cross", "weights_per_head", "padding", "causal_padding"]
)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_attention_on_rows_folded_into_the_batch_dimension(
    name: str, batch_first: bool, engine_ways: str
) -> None:
    """Each sample's rows attend within themselves: its gradient sums over all of them (the
    key padding mask, ``(B H, S)``, unfolded with them)."""
    model = AlongRows(name, batch_first).double().eval()
    check_against_references(model, torch.randn(5, 3, S, E, dtype=torch.float64))


class _CausalHint(nn.Module):
    """Attention given ``is_causal=True`` beside a mask that is not causal: PyTorch's
    attention (without weights or a padding mask) then uses a causal mask and ignores it."""

    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.zeros(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        y, _ = self.att(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
        return self.head(y[:, 0])


def test_the_rule_takes_the_causal_hint_as_pytorch_does() -> None:
    torch.manual_seed(0)
    model = _CausalHint().double().eval()
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
