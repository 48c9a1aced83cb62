r"""Likelihoods: what turns model outputs ``f`` (shape ``(B, C)``, or ``(B, *S, C)``) into Fisher
vectors.

Every estimator of the diagonal Fisher is a sum of squared pull-backs

.. math::

    \hat F = \frac{1}{N} \sum_{n=1}^{N} \sum_{k=1}^{K} \big(J_n^\top v_{nk}\big)^{\odot 2},
    \qquad J_n = \partial f(x_n) / \partial \theta \in \mathbb{R}^{C \times P},

for a few output-space vectors :math:`v_{nk} \in \mathbb{R}^C` per sample, which only the
likelihood knows:

* ``exact``: columns of a factor :math:`S_n` with :math:`S_n S_n^\top = F_f(x_n) =
  \mathbb{E}_{y \sim p(\cdot|f_n)}[s(y) s(y)^\top]`, the Fisher in output space;
* ``sample``: :math:`v_{nj} = s(\hat y_j)/\sqrt{m}` with :math:`\hat y_j \sim p(\cdot|f_n)`;
* ``empirical``: :math:`v_{n} = s(y_n)` with the data's label,

where :math:`s(y) = \partial \log p(y|f) / \partial f` is the score in output space.
Vectors are returned as ``(K, B, C)`` tensors (``K`` leading, as batched backward passes want).

Sequence (or any structured) outputs ``(B, *S, C)``, the class dimension last, are ``|S|``
independent positions given ``f``: :math:`\log p(y|f) = \sum_{s \in S} \log p(y_s|f_s)`. The
score is the per-position scores side by side, and, since each position's score has mean zero,
the output-space Fisher is block-diagonal over positions: the exact factor holds, for each
position, that position's ``K_f`` vectors (``C``, or ``C - 1`` for the softmax) and zeros
elsewhere, ``K = |S| K_f`` in all. Samples draw every position independently; vectors are
``(K, B, *S, C)``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LIKELIHOODS", "Bernoulli", "Categorical", "Gaussian", "Likelihood", "get_likelihood"]


class Likelihood(ABC):
    """A conditional distribution :math:`p(y|f)` over targets given model outputs ``f: (B, C)``
    or ``(B, *S, C)`` (positions ``S`` independent given ``f``)."""

    name: str
    #: Target value that marks a position to leave out (Hugging Face's ``-100``), or ``None``.
    ignore_index: int | None = None

    def check_output(self, output: object, batch_size: int) -> Tensor:
        """Validate the (``output_fn``-mapped) model output and return it."""
        if not isinstance(output, Tensor):
            raise ValueError(
                f"the model output (after output_fn) must be a tensor of shape (B, C), got "
                f"{type(output).__name__}; pass output_fn to map the model's output to (B, C) "
                "logits"
            )
        if output.dim() < 2 or output.shape[0] != batch_size or output.shape[-1] < 1:
            raise ValueError(
                f"the model output (after output_fn) must have shape (B, C) = ({batch_size}, C) "
                f"with C >= 1 for a batch of {batch_size} samples, got {tuple(output.shape)}; "
                "pass output_fn to select or reshape the logits (B is the first dimension of "
                "the batch's labels, or without labels of its first input tensor)"
            )
        if not output.is_floating_point():
            raise ValueError(f"the model output must be floating point, got {output.dtype}")
        return output

    @abstractmethod
    def check_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        """Validate data targets against ``output`` and return them in canonical form."""

    @abstractmethod
    def position_log_likelihood(self, output: Tensor, targets: Tensor) -> Tensor:
        """:math:`\\log p(y_{ns}|f_{ns})` per sample and position, shape ``(B, *S)``."""

    def log_likelihood(
        self, output: Tensor, targets: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Per-sample :math:`\\log p(y_n|f_n) = \\sum_s \\log p(y_{ns}|f_{ns})` over the positions
        where ``mask`` (``(B, *S)``, default all) is true; shape ``(B,)``, differentiable in
        ``output``."""
        ll = self.position_log_likelihood(output, targets)
        if mask is not None:
            ll = torch.where(mask, ll, torch.zeros((), dtype=ll.dtype, device=ll.device))
        return ll.reshape(ll.shape[0], -1).sum(1)

    @abstractmethod
    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        """:math:`s(y) = \\partial \\log p(y|f)/\\partial f`, same shape as ``output``.

        ``output`` is ``(..., B, C)`` and ``targets`` broadcast against it (leading sample dims).
        """

    @abstractmethod
    def position_factor(self, output: Tensor) -> Tensor:
        """Per position, a factor of that position's output-space Fisher: ``(K_f, B, *S, C)``
        (``K_f = C``, or fewer where the Fisher has a lower rank)."""

    def exact_vectors(self, output: Tensor) -> Tensor:
        """A factor of the output-space Fisher: ``(K, B, *S, C)`` with ``Σ_k v_k v_kᵀ = F_f``,
        ``K = |S| K_f`` for a position factor of ``K_f`` columns (``(K_f, B, C)`` for plain
        ``(B, C)`` outputs)."""
        factor = self.position_factor(output)
        if output.dim() == 2:
            return factor
        # v[(s, k), b, s', :] = factor[k, b, s, :] if s' == s else 0
        c, batch, *positions, _ = factor.shape
        flat = factor.reshape(c, batch, -1, output.shape[-1]).movedim(2, 0)  # (L, C, B, C)
        length = flat.shape[0]
        eye = torch.eye(length, dtype=output.dtype, device=output.device)
        spread = flat.unsqueeze(3) * eye.view(length, 1, 1, length, 1)  # (L, C, B, L, C)
        return spread.reshape(length * c, batch, *positions, output.shape[-1])

    @abstractmethod
    def draw_shape(self, output: Tensor, m: int) -> tuple[int, ...]:
        """The shape of the uniforms that ``m`` draws for one sample of ``output`` take."""

    @abstractmethod
    def sample_from(self, output: Tensor, uniforms: Tensor) -> Tensor:
        """Targets ``(m, B, ...)`` from :meth:`uniforms` ``(B, *draw_shape(output, m))``."""

    def uniforms(
        self,
        output: Tensor,
        m: int,
        generator: torch.Generator | None,
        count: int | None = None,
    ) -> Tensor:
        """The uniforms of ``m`` draws for each of ``count`` samples (default: the batch of
        ``output``), ``(count, *draw_shape(output, m))`` in float64.

        They consume the generator sample by sample (row-major), so the draws do not depend on
        how the data is split into batches or chunks.
        """
        rows = output.shape[0] if count is None else count
        return _uniform((rows, *self.draw_shape(output, m)), output, generator)

    def sample(self, output: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Draw ``m`` targets per sample from :math:`p(\\cdot|f)`, shape ``(m, B, ...)``."""
        return self.sample_from(output, self.uniforms(output, m, generator))

    def empirical_vectors(self, output: Tensor, targets: Tensor) -> Tensor:
        return self.score(output, self.check_targets(output, targets)).unsqueeze(0)

    def sample_vectors(self, output: Tensor, uniforms: Tensor) -> Tensor:
        """The ``m`` scores of the targets drawn from ``uniforms`` (:meth:`uniforms`), over
        :math:`\\sqrt m`: ``(m, B, *S, C)``."""
        m = uniforms.shape[1]
        return self.score(output, self.sample_from(output, uniforms)) / math.sqrt(m)


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return u.to(like.device)


def _normal(u: Tensor, dtype: torch.dtype) -> Tensor:
    """Standard normals by Box-Muller from uniforms ``(..., 2)`` of :func:`_uniform`, which
    draws serially: unlike ``torch.randn`` (vectorised on CPU for large tensors) the stream
    does not depend on how the data is split into batches."""
    z = (-2 * torch.log1p(-u[..., 0])).sqrt() * torch.cos(2 * math.pi * u[..., 1])
    return z.to(dtype)


def _class_eye(output: Tensor) -> Tensor:
    """The ``C x C`` identity shaped ``(C, 1, ..., 1, C)``, to broadcast over ``(C, B, *S, C)``."""
    c = output.shape[-1]
    eye = torch.eye(c, dtype=output.dtype, device=output.device)
    return eye.view(c, *[1] * (output.dim() - 1), c)


class Categorical(Likelihood):
    r"""Softmax over ``C`` classes: :math:`p = \mathrm{softmax}(f)`, targets are class indices.

    Score :math:`s(y) = e_y - p`; output-space Fisher :math:`\mathrm{diag}(p) - pp^\top =
    \sum_c v_c v_c^\top` with :math:`v_c = \sqrt{p_c}\,(e_c - p)`. That factor has rank
    ``C - 1`` (:math:`\sum_c \sqrt{p_c}\, v_c = 0`), so :meth:`position_factor` gives one of
    ``C - 1`` columns instead (``K = C - 1``): with :math:`u = \sqrt p` and the Householder
    reflection :math:`H = I - 2hh^\top/h^\top h`, :math:`h = u + e_C` (so :math:`Hu = -e_C`;
    :math:`h^\top h = 2 + 2u_C \ge 2`, never small), :math:`\mathrm{diag}(p) - pp^\top =
    D^{1/2}(I - uu^\top)D^{1/2} = D^{1/2} H (I - e_C e_C^\top) H D^{1/2}`, whose first
    ``C - 1`` columns :math:`v_j = \sqrt p \odot \big(e_j - h\, u_j/(1 + u_C)\big)` suffice.
    Each position reflects onto its most probable class ``m`` in place of ``C`` (moved to the
    last place and back): :math:`u_m \ge 1/\sqrt C`, so no entry cancels (onto a fixed class,
    :math:`1 - p_j/(1 + u_C)` for a dominant ``j`` and a tiny :math:`p_C` was rounding: the
    Fisher 2% off at a logit margin of 30 in float32, 14% at 35). The score's entry at the
    label, :math:`1 - p_y`, is summed from the other classes' probabilities, not subtracted.
    With positions, targets ``(B, *S)`` hold one class per position; ``-100`` leaves a
    position out.
    """

    name = "categorical"
    ignore_index = -100

    def check_output(self, output: object, batch_size: int) -> Tensor:
        output = super().check_output(output, batch_size)
        if output.shape[-1] == 1:
            warnings.warn(
                "ewc_reg: a categorical likelihood over 1 class gives p(y|x) = 1 for every "
                "input, so the Fisher is 0 and EWC protects nothing; a binary classifier with "
                'one logit needs likelihood="bernoulli"',
                stacklevel=2,
            )
        return output

    def check_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        num_classes = output.shape[-1]
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                f"categorical targets must be integer class indices in [0, {num_classes}), got "
                f"dtype {targets.dtype}"
            )
        if targets.shape != output.shape[:-1]:
            raise ValueError(
                f"categorical targets must have shape {tuple(output.shape[:-1])} (one class "
                f"index per {'sample' if output.dim() == 2 else 'sample and position'}), got "
                f"{tuple(targets.shape)}"
            )
        # (the extremes in one reduction and one sync; a label outside is found only then)
        lowest, highest = torch.stack(targets.aminmax()).tolist() if targets.numel() else (0, 0)
        if lowest < 0 or highest >= num_classes:
            label = int(targets[(targets < 0) | (targets >= num_classes)][0])
            positions = (
                f", or {self.ignore_index} to leave a position out" if targets.dim() > 1 else ""
            )
            raise ValueError(
                f"target label {label} is outside the C={num_classes} classes of the model "
                f"output; labels must lie in [0, {num_classes}){positions} (remap them, or use "
                "output_fn to select the matching output units)"
            )
        return targets.long()

    def position_log_likelihood(self, output: Tensor, targets: Tensor) -> Tensor:
        return -F.cross_entropy(output.movedim(-1, 1), targets, reduction="none")

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        probs = torch.softmax(output, dim=-1)
        # e_y - p, its entry at y as the sum of the others' p (1 - p_y is 0 in float32 once
        # p_y rounds to 1); F.one_hot would check the labels again, with two device syncs
        label = targets.unsqueeze(-1)  # (targets may have leading draws: (m, B, *S))
        others = probs.expand(*targets.shape, probs.shape[-1]).scatter(-1, label, 0.0)
        return torch.zeros_like(others).scatter_(-1, label, others.sum(-1, keepdim=True)) - others

    def position_factor(self, output: Tensor) -> Tensor:
        probs = torch.softmax(output, dim=-1)  # (B, *S, C)
        classes = output.shape[-1]
        if classes == 1:  # (a Fisher of zero: one zero vector)
            return torch.zeros_like(output).unsqueeze(0)
        # (the classes with each position's most probable one and the last swapped: an
        # involution, so that the same gather moves them back)
        top = probs.argmax(-1, keepdim=True)
        swap = torch.arange(classes, device=output.device).expand_as(probs).scatter(
            -1, top, classes - 1
        )
        swap[..., -1:] = top
        root = probs.gather(-1, swap).sqrt()
        h = torch.cat([root[..., :-1], root[..., -1:] + 1], dim=-1)  # u + e_C
        weights = (root[..., :-1] / (1 + root[..., -1:])).movedim(-1, 0).unsqueeze(-1)
        # (C-1, B, *S, C): v[j, b, s] = sqrt(p[b, s]) * (e_j - h[b, s] u_j / (1 + u_C))
        factor = root.unsqueeze(0) * (_class_eye(output)[: classes - 1] - weights * h.unsqueeze(0))
        return factor.gather(-1, swap.expand_as(factor))

    def draw_shape(self, output: Tensor, m: int) -> tuple[int, ...]:
        return (m, *output.shape[1:-1])

    def sample_from(self, output: Tensor, uniforms: Tensor) -> Tensor:
        # Inverse-CDF sampling from uniforms (B, m, *S).
        cdf = torch.softmax(output.double(), dim=-1).cumsum(dim=-1).unsqueeze(1)
        u = (uniforms * cdf[..., -1]).unsqueeze(-1)  # (B, m, *S, 1)
        cdf = cdf.expand(*u.shape[:-1], cdf.shape[-1]).contiguous()  # (B, m, *S, C)
        draws = torch.searchsorted(cdf, u, right=True).squeeze(-1)
        return draws.clamp_(max=output.shape[-1] - 1).movedim(1, 0)  # (m, B, *S)


class Gaussian(Likelihood):
    r"""Unit-variance Gaussian regression: :math:`y \sim \mathcal N(f, I)`, float targets
    ``(B, C)``.

    Score :math:`s(y) = y - f`; output-space Fisher :math:`I = \sum_k e_k e_k^\top` (``K = C``).
    Targets of shape ``(B,)`` are accepted when ``C = 1``.
    """

    name = "gaussian"

    def check_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 1 and output.shape[-1] == 1:
            targets = targets.unsqueeze(-1)
        if targets.shape != output.shape:
            raise ValueError(
                f"gaussian targets must have the output's shape {tuple(output.shape)}, got "
                f"{tuple(targets.shape)}"
            )
        return targets.to(output.dtype)

    def position_log_likelihood(self, output: Tensor, targets: Tensor) -> Tensor:
        c = output.shape[-1]
        return -0.5 * (targets - output).pow(2).sum(-1) - 0.5 * c * math.log(2 * math.pi)

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        return targets - output

    def position_factor(self, output: Tensor) -> Tensor:
        return _class_eye(output).expand(output.shape[-1], *output.shape)

    def draw_shape(self, output: Tensor, m: int) -> tuple[int, ...]:
        return (m, *output.shape[1:], 2)  # (two uniforms per normal)

    def sample_from(self, output: Tensor, uniforms: Tensor) -> Tensor:
        return output.unsqueeze(0) + _normal(uniforms, output.dtype).movedim(1, 0)

    def sample_vectors(self, output: Tensor, uniforms: Tensor) -> Tensor:
        # s(f + z) = z itself: (f + z) - f rounds z to |f|'s precision (float32 outputs of
        # 1e6 gave a Fisher 1.8% off)
        m = uniforms.shape[1]
        return _normal(uniforms, output.dtype).movedim(1, 0) / math.sqrt(m)


class Bernoulli(Likelihood):
    r"""Independent sigmoids (multi-label): :math:`y_k \sim \mathrm{Bernoulli}(\sigma(f_k))`.

    Targets have the output's shape with values in [0, 1]. Score :math:`s(y) = y - \sigma(f)`;
    output-space Fisher :math:`\mathrm{diag}(\sigma(1-\sigma))`, factor
    :math:`v_k = \sqrt{\sigma_k(1-\sigma_k)}\, e_k` (``K = C``).
    """

    name = "bernoulli"

    def check_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 1 and output.shape[-1] == 1:
            targets = targets.unsqueeze(-1)
        if targets.shape != output.shape:
            raise ValueError(
                f"bernoulli targets must have the output's shape {tuple(output.shape)}, got "
                f"{tuple(targets.shape)}"
            )
        targets = targets.to(output.dtype)
        if bool(((targets < 0) | (targets > 1)).any()):
            raise ValueError("bernoulli targets must lie in [0, 1]")
        return targets

    def position_log_likelihood(self, output: Tensor, targets: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(output, targets, reduction="none").sum(-1)

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        # y (1 - σ(f)) - (1 - y) σ(f) with 1 - σ(f) = σ(-f): no cancellation where σ(f) ~ 1
        return targets * torch.sigmoid(-output) - (1 - targets) * torch.sigmoid(output)

    def position_factor(self, output: Tensor) -> Tensor:
        # σ(f) σ(-f): 1 - σ(f) is 0 in float32 once σ(f) rounds to 1 (a Fisher of 0 at f = 20)
        scale = (torch.sigmoid(output) * torch.sigmoid(-output)).sqrt()  # (B, *S, C)
        return _class_eye(output) * scale.movedim(-1, 0).unsqueeze(-1)

    def draw_shape(self, output: Tensor, m: int) -> tuple[int, ...]:
        return (m, *output.shape[1:])

    def sample_from(self, output: Tensor, uniforms: Tensor) -> Tensor:
        return (uniforms.movedim(1, 0) < torch.sigmoid(output.double())).to(output.dtype)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Categorical, Gaussian, Bernoulli)
}


def get_likelihood(name: str) -> Likelihood:
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
