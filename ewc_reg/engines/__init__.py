"""Fisher engines: interchangeable ways to compute sums of squared pull-backs.

``get_engine(backend, model, params)`` resolves a backend name to an engine for the Fisher of
``params`` (by default, all of ``model``'s parameters with ``requires_grad``):

* ``"hooks"`` (:class:`~.hooks.HookEngine`): one forward pass with hooks, one backward pass
  batched over the vectors and per-layer rules; fast, for models whose selected parameters each
  are used only while the modules they are registered on run (a ``ValueError`` says why a
  model is not covered);
* ``"functorch"`` (:class:`~.functorch.FunctorchEngine`): per-sample ``torch.func`` pull-backs
  of the whole model; general, except for modules ``vmap`` cannot run (``nn.LSTM``) and models
  that reach a parameter other than through its registered name (a view of it made before the
  forward pass), which it hands to the loop engine;
* ``"loop"`` (:class:`~.loop.LoopEngine`): one sample and one vector at a time with plain
  autograd; slow, and as general as autograd;
* ``"auto"``: the hook engine, which hands the model to the functorch engine (and logs why at
  info level to the ``"ewc_reg"`` logger) as soon as it finds the model is not covered.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import attention, convolution, norm_act, recurrent  # noqa: F401  (register their rules)
from .base import Engine, accumulation_dtype, zero_sums
from .functorch import FunctorchEngine
from .hooks import HookEngine
from .loop import LoopEngine

ENGINES: dict[str, type] = {"hooks": HookEngine, "functorch": FunctorchEngine, "loop": LoopEngine}
BACKENDS = ("auto", *ENGINES)


def get_engine(
    backend: str, model: nn.Module, params: dict[str, Tensor] | None = None
) -> Engine:
    """The engine for ``backend`` (one of :data:`BACKENDS`), ``model`` and the parameters
    ``params`` (names as in ``named_parameters()``; ``None``: all with ``requires_grad``).

    Only the selected parameters are checked: tied weights elsewhere in the model, say, do not
    keep the hook engine from a head-only Fisher.

    Raises:
        ValueError: an unknown backend, or ``"hooks"`` for a model and parameters it does not
            cover.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend in ("functorch", "loop"):
        return ENGINES[backend]()
    return HookEngine.for_model(model, params, FunctorchEngine() if backend == "auto" else None)


__all__ = ["BACKENDS", "ENGINES", "Engine", "accumulation_dtype", "get_engine", "zero_sums"]
