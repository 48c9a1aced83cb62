"""Independent references: brute-force autograd loops, one sample (and one label) at a time."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads(scalar: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    grads = torch.autograd.grad(scalar, list(params.values()), retain_graph=True, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)
    }


def brute_force_fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    method: str,
    output_fn: Callable[[Tensor], Tensor] = lambda out: out,
    sampled: Tensor | None = None,
) -> dict[str, Tensor]:
    """Categorical Fisher, one sample and one class at a time (model in eval mode).

    exact: Σ_y p(y|x) g_y²; empirical: g_{y_n}²; sample: mean over the given ``sampled`` labels
    ``(m, N)`` of g_ŷ². All averaged over the N samples.
    """
    was_training = model.training
    model.eval()
    params = _trainable(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = inputs.shape[0]
    for i in range(n_samples):
        log_probs = torch.log_softmax(output_fn(model(inputs[i : i + 1]))[0], dim=-1)
        if method == "exact":
            weighted = [(c, log_probs[c].exp().item()) for c in range(log_probs.shape[0])]
        elif method == "empirical":
            weighted = [(int(targets[i]), 1.0)]
        else:
            labels = sampled[:, i].tolist()
            weighted = [(c, 1.0 / len(labels)) for c in labels]
        for c, w in weighted:
            for n, g in _grads(log_probs[c], params).items():
                total[n] += w * g.pow(2)
    model.train(was_training)
    return {n: t / n_samples for n, t in total.items()}


def brute_force_batched(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    output_fn: Callable[[Tensor], Tensor] = lambda out: out,
) -> dict[str, Tensor]:
    """Mean over batches of the squared gradient of the batch-mean log-likelihood."""
    was_training = model.training
    model.eval()
    params = _trainable(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        mean_ll = torch.log_softmax(output_fn(model(x)), -1).gather(1, y[:, None]).mean()
        for n, g in _grads(mean_ll, params).items():
            total[n] += g.pow(2)
    model.train(was_training)
    return {n: t / len(batches) for n, t in total.items()}


def jacrev_ggn_diagonal(
    model: nn.Module,
    inputs: Tensor,
    output_fn: Callable[[Tensor], Tensor] = lambda out: out,
    output_hessian: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """diag(Jᵀ H J) averaged over samples, with full per-sample Jacobians from ``jacrev``.

    ``output_hessian(f)`` gives the ``(C, C)`` output-space Fisher; default: the categorical
    ``diag(p) − ppᵀ``.
    """
    from torch.func import functional_call, jacrev

    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in _trainable(model).items()}
    if output_hessian is None:

        def output_hessian(f: Tensor) -> Tensor:
            p = torch.softmax(f, -1)
            return torch.diag(p) - torch.outer(p, p)

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(inputs.shape[0]):

        def f(theta: dict[str, Tensor], x: Tensor = inputs[i : i + 1]) -> Tensor:
            return output_fn(functional_call(model, theta, (x,), strict=False))[0]

        jac = jacrev(f)(params)  # name -> (C, *shape)
        out = f(params).detach()
        hess = output_hessian(out)
        for n, j in jac.items():
            flat = j.reshape(j.shape[0], -1)  # (C, P)
            total[n] += torch.einsum("cp,cd,dp->p", flat, hess, flat).reshape(total[n].shape)
    model.train(was_training)
    return {n: t / inputs.shape[0] for n, t in total.items()}


def rel_err(a: Tensor, b: Tensor) -> float:
    denom = max(b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / denom


def assert_close_dicts(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = rel_err(a[name], b[name])
        assert err <= rtol and math.isfinite(err), f"{name}: relative error {err:.3g} > {rtol}"


def positions_first(h: Tensor) -> Tensor:
    """``(B, 2k)`` features as ``(2B, k)`` rows folded into the batch dimension positions
    first (row ``iB + n`` is sample ``n``'s position ``i``): a parameter meeting such rows
    takes no per-sample copies, shadowed or not (a sample's rows are not together)."""
    return h.unflatten(1, (2, -1)).transpose(0, 1).flatten(0, 1)


def samples_first(rows: Tensor, batch_size: int) -> Tensor:
    """:func:`positions_first`'s rows ``(2B, m)`` back to ``(B, 2m)``."""
    return rows.unflatten(0, (2, batch_size)).transpose(0, 1).flatten(1)
