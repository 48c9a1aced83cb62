"""The library on CUDA: every estimator and backend against the same computation on CPU.

Skipped without a GPU. On a GPU the CPU float64 result is the reference: the CUDA result must
match it to 1e-10 (float64), so any device-dependent code path (index tensors, generators,
accumulation buffers, the fused penalty) is checked against code already tested on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ewc_reg import EWCRegularizer, fisher_diagonal

from .models import cnn, mlp
from .reference import assert_close_dicts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N = 13


def problem(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = mlp(classes=5), torch.randn(N, 6, dtype=torch.float64)
    else:
        model, x = cnn(classes=5), torch.randn(N, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (N,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert all(t.is_cuda for t in tensors.values())
    return {n: t.cpu() for n, t in tensors.items()}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("backend", ["hooks", "functorch"])
@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_estimators_match_cpu(kind, backend, method):
    model, data = problem(kind)
    want = fisher_diagonal(model, data, method, backend=backend)
    gpu = copy.deepcopy(model).cuda()
    got = fisher_diagonal(gpu, data, method, backend=backend)  # CPU batches are moved
    assert_close_dicts(to_cpu(got), want, 1e-10)


@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_sample_is_reproducible_with_either_generator(generator_device):
    model, data = problem("cnn")
    gpu = model.cuda()

    def draw():
        gen = torch.Generator(device=generator_device).manual_seed(3)
        return fisher_diagonal(gpu, data, "sample", mc_samples=2, generator=gen)

    first, second = draw(), draw()
    assert_close_dicts(to_cpu(first), to_cpu(second), 0.0)


def test_sample_with_a_cpu_generator_matches_cpu():
    # Draws come from the generator's device, so a CPU generator gives the CPU labels.
    model, data = problem("mlp")
    want = fisher_diagonal(model, data, "sample", generator=torch.Generator().manual_seed(5))
    got = fisher_diagonal(copy.deepcopy(model).cuda(), data, "sample",
                          generator=torch.Generator().manual_seed(5))
    assert_close_dicts(to_cpu(got), want, 1e-10)


def test_sequence_model_matches_cpu():
    from .test_sequences import make_model, padded_batches

    model = make_model()
    batches = padded_batches()
    want = fisher_diagonal(model, batches, "exact")
    got = fisher_diagonal(copy.deepcopy(model).cuda(), batches, "exact")
    assert_close_dicts(to_cpu(got), want, 1e-10)


def test_half_precision_model_accumulates_in_float32():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3)).cuda().bfloat16()
    x = torch.randn(8, 2, 4, 4, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 3, (8,), device="cuda")
    fisher = fisher_diagonal(model, [(x, y)], "exact")
    assert all(f.dtype == torch.float32 and f.is_cuda for f in fisher.values())
    reference = fisher_diagonal(copy.deepcopy(model).float(), [(x.float(), y)], "exact")
    for name, value in fisher.items():
        err = (value - reference[name]).norm() / reference[name].norm()
        assert err < 5e-2, name


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_regularizer_matches_cpu(mode):
    model, data = problem("cnn")
    gpu = copy.deepcopy(model).cuda()
    regs = [EWCRegularizer(m, strength=3.0, mode=mode, gamma=0.7) for m in (model, gpu)]
    for step in range(2):
        for m, reg in zip((model, gpu), regs):
            torch.manual_seed(step)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.2 * torch.randn(p.shape, dtype=p.dtype).to(p.device))
            reg.consolidate(data)
    values = []
    for m, reg in zip((model, gpu), regs):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.1)
        m.zero_grad()
        pen = reg.penalty()
        pen.backward()
        values.append((pen.item(), {n: p.grad.cpu() for n, p in m.named_parameters()}))
    assert values[1][0] == pytest.approx(values[0][0], rel=1e-10)
    assert_close_dicts(values[1][1], values[0][1], 1e-10)
    gpu.zero_grad()
    regs[1].add_penalty_grad()  # (the same gradient, on the GPU, without a graph)
    assert_close_dicts({n: p.grad.cpu() for n, p in gpu.named_parameters()}, values[0][1], 1e-10)


def test_state_dict_moves_between_devices():
    model, data = problem("mlp")
    gpu = copy.deepcopy(model).cuda()
    reg = EWCRegularizer(gpu, strength=2.0)
    reg.consolidate(data)
    with torch.no_grad():
        for p in gpu.parameters():
            p.add_(0.1)
    state = reg.state_dict()
    restored = EWCRegularizer(model, strength=2.0)
    restored.load_state_dict(state)
    assert all(not t.is_cuda for t in restored.fisher.values())
    with torch.no_grad():
        for p, q in zip(model.parameters(), gpu.parameters()):
            p.copy_(q.cpu())
    assert restored.penalty().item() == pytest.approx(reg.penalty().item(), rel=1e-12)


def test_attention_rule_matches_cpu():
    from benchmarks.models import TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(10).double().eval()  # nn.TransformerEncoderLayer, batch_first MHA
    x, y = torch.randint(0, 1000, (16, 32)), torch.randint(0, 10, (16,))
    want = fisher_diagonal(model, [(x, y)], "exact")
    got = fisher_diagonal(copy.deepcopy(model).cuda(), [(x, y)], "exact", backend="hooks")
    assert_close_dicts(to_cpu(got), want, 1e-10)


@pytest.mark.parametrize("kind", ["vit", "lstm"])
def test_per_sample_copies_and_recurrent_rule_match_cpu(kind):
    """A torchvision ViT (class token and position embedding: per-sample copies) and an LSTM
    classifier (the recurrent rule) on the hooks engine."""
    from benchmarks.models import LSTMClassifier, small_vit

    torch.manual_seed(0)
    if kind == "vit":
        model, x = small_vit(10, quick=True), torch.randn(8, 3, 32, 32, dtype=torch.float64)
    else:
        model, x = LSTMClassifier(10, vocab_size=50, dim=8), torch.randint(0, 50, (8, 6))
    model = model.double().eval()
    y = torch.randint(0, 10, (8,))
    want = fisher_diagonal(model, [(x, y)], "exact")
    got = fisher_diagonal(copy.deepcopy(model).cuda(), [(x, y)], "exact", backend="hooks")
    assert_close_dicts(to_cpu(got), want, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_recurrent_layers_run_through_cudnn_in_eval_mode(dtype, backend, method):
    """cuDNN's backward of a recurrent layer refuses eval mode, which the Fisher is computed
    in: the ``batched`` method and the engines that call the layer itself (a projected LSTM:
    loop; functorch hands it to loop) failed. Against the CPU in float64 (TF32 off)."""
    from .test_recurrent_rule import Tagger

    torch.manual_seed(0)
    model = Tagger(num_layers=2, dropout=0.5, proj_size=3).double().eval()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    kwargs = {} if method == "batched" else {"backend": backend}
    want = fisher_diagonal(model, [(x, y)], method, **kwargs)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = fisher_diagonal(gpu, [(x.to(dtype), y)], method, **kwargs)
    assert not gpu.training and gpu.rnn.dropout == 0.5
    got = {n: f.double() for n, f in to_cpu(got).items()}
    assert_close_dicts(got, want, 1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("kind", ["lstm_cell", "shared_mlp", "transformer_shared", "tied_lm"])
def test_modules_called_more_than_once_and_tied_weights_match_cpu(kind):
    """Units called more than once (their calls joined by the rules, a cell stepped by hand,
    a universal transformer) and tied weights (an embedding tied to the output layer: its rule)."""
    from benchmarks.models import LSTMCellClassifier, SharedBlockMLP, TextTransformer

    from .test_hooks_engine import TinyLanguageModel

    torch.manual_seed(0)
    if kind == "lstm_cell":
        model, x = LSTMCellClassifier(10, vocab_size=50, dim=8), torch.randint(0, 50, (8, 6))
    elif kind == "shared_mlp":
        model, x = SharedBlockMLP(10, width=16), torch.randn(8, 1, 28, 28, dtype=torch.float64)
    elif kind == "transformer_shared":
        sizes = dict(vocab_size=50, seq_len=8, d_model=16, d_feedforward=32)
        model, x = TextTransformer(10, **sizes, shared=True), torch.randint(0, 50, (8, 8))
    else:
        model, x = TinyLanguageModel(), torch.randint(0, 7, (8, 5))
    model = model.double().eval()
    y = x.roll(-1, 1) if kind == "tied_lm" else torch.randint(0, 10, (8,))
    want = fisher_diagonal(model, [(x, y)], "exact")
    got = fisher_diagonal(copy.deepcopy(model).cuda(), [(x, y)], "exact", backend="hooks")
    assert_close_dicts(to_cpu(got), want, 1e-10)


@pytest.mark.parametrize("kind", ["upsampling", "conv3d", "siamese_upsampling"])
def test_transposed_and_3d_convolutions_match_cpu(kind):
    """The transposed-convolution rule (phase grids, taps' windows) and the 3-d patches, also
    with each layer called twice."""
    from benchmarks.models import upsampling_cnn, volume_cnn

    from .test_hooks_engine import SiameseUpsampling

    torch.manual_seed(0)
    if kind == "upsampling":
        model, x = upsampling_cnn(10, width=4), torch.randn(8, 16, 4, 4, dtype=torch.float64)
    elif kind == "conv3d":
        model, x = volume_cnn(10, width=4), torch.randn(8, 3, 16, 16, 16, dtype=torch.float64)
    else:
        model, x = SiameseUpsampling(), torch.randn(8, 2, 4, 4, dtype=torch.float64)
    model = model.double().eval()
    y = torch.randint(0, 3 if kind == "siamese_upsampling" else 10, (8,))
    want = fisher_diagonal(model, [(x, y)], "exact")
    got = fisher_diagonal(copy.deepcopy(model).cuda(), [(x, y)], "exact", backend="hooks")
    assert_close_dicts(to_cpu(got), want, 1e-10)


def consolidated_and_moved_on():
    """The MLP on CPU with a regularizer consolidated on its data, then moved on from the
    anchor."""
    model, data = problem("mlp")
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    return model, reg


def test_penalty_follows_the_model_moved_after_consolidate():
    model, reg = consolidated_and_moved_on()
    want = reg.penalty().item()
    model.cuda()
    got = reg.penalty()
    assert got.is_cuda and got.item() == pytest.approx(want, rel=1e-12)
    assert all(t.is_cuda for t in [*reg.fisher.values(), *reg.anchor.values()])


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_consolidate_follows_the_model_moved_after_consolidate(mode):
    """Consolidated on the CPU, moved to the GPU and consolidated again before any penalty:
    the earlier state moves along and merges as on the CPU."""
    model, data = problem("mlp")
    twin = copy.deepcopy(model)
    reg, cpu = EWCRegularizer(model, mode=mode), EWCRegularizer(twin, mode=mode)
    reg.consolidate(data)
    cpu.consolidate(data)
    model.cuda()
    reg.consolidate(data)
    cpu.consolidate(data)
    assert_close_dicts(to_cpu(reg.fisher), cpu.fisher, 1e-10)
    assert_close_dicts(to_cpu(reg.anchor), cpu.anchor, 1e-10)


def test_penalty_of_a_model_split_across_devices():
    """A model with layers on the CPU and on the GPU: the penalty sums its parameters' terms
    on the first one's device; its gradient and add_penalty_grad's match the CPU model's."""
    model, reg = consolidated_and_moved_on()
    reference = reg.penalty()
    want = torch.autograd.grad(reference, list(model.parameters()))
    model[4].cuda()
    split = reg.penalty()
    got = torch.autograd.grad(split, list(model.parameters()))
    assert split.item() == pytest.approx(reference.item(), rel=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=0)
    reg.add_penalty_grad()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad.cpu(), w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tf32", [False, True])
def test_a_float32_conv_net_on_cuda_stays_on_the_hooks_engine(tf32, caplog):
    """The hooks engine compares the model's output on two samples alone with theirs in the
    batch (mixed samples); with TF32 allowed, cuDNN may pick kernels that round differently
    for the two batch sizes, so float32 on CUDA gets the looser tolerance of
    ``ewc_reg._batches.OUTPUT_TOLERANCE``: the model must not leave the engine for that."""
    import logging

    model, batches = problem("cnn")
    model = model.float().cuda()
    batches = [(x.float().cuda(), y.cuda()) for x, y in batches]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            fisher_diagonal(model, batches, "exact")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
