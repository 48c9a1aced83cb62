r"""``EWCRegularizer``: a thin stateful object over :func:`ewc_reg.fisher_diagonal`.

Both modes keep the penalty in one compact form, with per-parameter precision ``A``, centre
``μ`` and a scalar offset ``c``:

.. math::

    \mathrm{penalty}(\theta) = \frac{\lambda}{2}\Big(\sum_i A_i(\theta_i - \mu_i)^2 + c\Big).

* ``mode="online"``: at task ``t``, :math:`A \leftarrow \gamma A + F_t`, :math:`\mu \leftarrow
  \theta_t` (the current parameters), :math:`c = 0`.
* ``mode="separate"``: one quadratic per task,
  :math:`\sum_t \gamma^{T-t} F_t(\theta - \theta_t)^2 = A(\theta - \mu)^2 + c` with
  :math:`A = \sum_t \gamma^{T-t}F_t` and :math:`\mu = A^{-1}\sum_t \gamma^{T-t}F_t\theta_t`;
  the offset is updated without cancellation as
  :math:`c' = \gamma c + \sum_i \big[\gamma A_i(\mu_i - \mu'_i)^2 + F_i(\theta_i - \mu'_i)^2\big]`.
  Memory does not grow with the number of tasks.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._penalty import add_penalty_grad, ewc_penalty
from ._validation import check_choice, check_count, check_real
from .distributed import process_group_for, unwrap_model
from .engines.base import accumulation_dtype
from .fisher import (
    METHODS,
    ParamSelection,
    checked_selection,
    fisher_diagonal,
    select_parameters,
    selected_parameters,
)
from .likelihoods import LIKELIHOODS

__all__ = ["MODES", "EWCRegularizer"]

#: How Fishers of successive tasks are combined.
MODES = ("online", "separate")

#: The settings a regularizer is made with, each with its check: they are public attributes,
#: checked on every assignment too (``reg.strength = 1e6`` between tasks).
_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "strength": lambda v: check_real("strength", v, 0.0),
    "method": lambda v: check_choice("method", v, METHODS),
    "mode": lambda v: check_choice("mode", v, MODES),
    "gamma": lambda v: check_real("gamma", v, 0.0, 1.0),
    "n_samples": lambda v: check_count("n_samples", v, allow_none=True),
    "mc_samples": lambda v: check_count("mc_samples", v),
    "likelihood": lambda v: check_choice("likelihood", v, tuple(LIKELIHOODS)),
}

#: How ``consolidate`` computes in a distributed run: attributes checked on assignment, like
#: the settings, but not part of a state (a process group is not saved).
_RUN_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "process_group": lambda v: _checked_group(v),
    "distributed": lambda v: _checked_flag("distributed", v),
}

#: The keyword arguments of :func:`~ewc_reg.fisher_diagonal` that ``consolidate`` passes on;
#: its others are the regularizer's (its model, settings and ``params``) or ``consolidate``'s.
_FISHER_EXTRAS = tuple(
    name
    for name in inspect.signature(fisher_diagonal).parameters
    if name not in {"model", "data", "output_fn", "generator", "progress", "params"}
    and name not in {*_SETTINGS, *_RUN_SETTINGS}
)

#: Every setting's name, as an attribute of the regularizer.
_SETTING_NAMES = (*_SETTINGS, "params", *_RUN_SETTINGS)

#: What a state's settings hold as ``params`` for a predicate, which a state cannot hold
#: (names are held as a list, so a string is never names).
_PREDICATE = "predicate"


class EWCRegularizer:
    r"""Elastic Weight Consolidation penalty :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i -
    \theta^*_i)^2` for any ``nn.Module``.

    Example::

        reg = EWCRegularizer(model, strength=1e5, method="exact")
        for task_loader in tasks:
            for x, y in task_loader:
                loss = criterion(model(x), y) + reg.penalty()
                ...
            reg.consolidate(task_loader)   # Fisher + anchor for this task

    Instead of adding ``reg.penalty()`` to the loss, ``reg.add_penalty_grad()`` after
    ``loss.backward()`` adds the same gradient to ``.grad``, faster (no graph, no value).

    The settings from ``strength`` to ``likelihood``, ``params``, ``process_group`` and
    ``distributed`` are attributes that may be changed between tasks (``reg.strength = 1e6``);
    every assignment is checked as the constructor checks (``process_group`` and
    ``distributed`` each alone: whether they go together, at the next ``consolidate``), and
    a new attribute named like one of them (``reg.n_sample = 100``) is an
    ``AttributeError``. ``num_tasks`` is read-only.

    Args:
        model: the module whose parameters (those with ``requires_grad``) are protected. A
            ``DistributedDataParallel``/``DataParallel`` wrapper, or that of
            ``torch.compile(model)``, is looked through: ``model`` becomes the wrapped module,
            so names carry no ``module.`` or ``_orig_mod.`` prefix and a ``state_dict`` fits
            the unwrapped model too. Training may go on through the wrapper.
        strength: :math:`\lambda >= 0`, finite. Its useful scale depends on ``method`` by orders of
            magnitude (see ``docs/fisher.md``).
        method: Fisher estimator, one of :data:`ewc_reg.fisher.METHODS`.
        mode: ``"online"`` (one running Fisher and the latest anchor) or ``"separate"`` (one
            quadratic per task, stored compactly); see the module docstring.
        gamma: decay in [0, 1] applied to the earlier tasks' Fisher at each consolidation.
        n_samples: estimate the Fisher on the first ``n_samples`` samples of each task.
        mc_samples: labels drawn per sample for ``method="sample"``.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
        params: which parameters to protect: ``None`` (all with ``requires_grad``), a list of
            names as in ``named_parameters()``, or a predicate ``(name, parameter) -> bool``
            (see :func:`ewc_reg.fisher.select_parameters`; one name is kept as a 1-tuple).
            Its type and names are checked here (a list of no names fails here too); what it
            selects, at each ``consolidate``, where it is re-applied: a selection of nothing
            fails there (a model without parameters, a predicate that selects none), and a
            frozen name unless the earlier tasks protect it. The others are left free
            and cost nothing.
        process_group: in a distributed run, ``consolidate`` treats each rank's data as a shard
            and every rank gets the Fisher of the union over this group (``None``: the default
            group when ``torch.distributed`` is initialised); see :mod:`ewc_reg.distributed`.
            With a replicated model (as DDP keeps it) the anchors are identical too.
        distributed: ``False`` makes ``consolidate`` use this rank's data only.
    """

    def __init__(
        self,
        model: nn.Module,
        strength: float = 1e5,
        method: str = "exact",
        mode: str = "online",
        gamma: float = 1.0,
        n_samples: int | None = None,
        mc_samples: int = 1,
        likelihood: str = "categorical",
        *,
        params: ParamSelection = None,
        process_group: dist.ProcessGroup | None = None,
        distributed: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.strength = strength  # (each checked by __setattr__)
        self.method = method
        self.mode = mode
        self.gamma = gamma
        self.n_samples = n_samples
        self.mc_samples = mc_samples
        self.likelihood = likelihood
        process_group_for(process_group, distributed)  # fail early on a contradiction
        self.params = params  # (checked by __setattr__)
        self.process_group = process_group
        self.distributed = distributed
        self._num_tasks = 0
        self._precision: dict[str, Tensor] = {}  # A
        self._center: dict[str, Tensor] = {}  # μ
        self._offset: Tensor | None = None  # c

    def __setattr__(self, name: str, value: Any) -> None:
        check = _SETTINGS.get(name) or _RUN_SETTINGS.get(name)
        if name == "params":
            value = self._checked_params(value)
        elif check is None and not name.startswith("_"):
            known = name in vars(self) or hasattr(type(self), name)  # (no property is run)
            if not known and (setting := _misspelt_setting(name)):
                raise AttributeError(
                    f"EWCRegularizer has no setting {name!r}; did you mean {setting!r}? "
                    f"Its settings: {_SETTING_NAMES}"
                )
        super().__setattr__(name, value if check is None else check(value))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also a regularizer pickled when ``num_tasks`` was a plain attribute."""
        if "num_tasks" in state:
            state = {**state, "_num_tasks": state["num_tasks"]}
            del state["num_tasks"]
        vars(self).update(state)

    @property
    def num_tasks(self) -> int:
        """How many tasks the state holds: ``consolidate`` calls, or a loaded state's count."""
        return self._num_tasks

    def _checked_params(self, params: ParamSelection) -> ParamSelection:
        """``params`` with names made a tuple (one string: a 1-tuple; an iterator would be
        used up by the first ``consolidate``), after checking its type and that the names are
        parameters of the model, and not none (these fail here, not at the next
        ``consolidate``). A frozen name is accepted: the earlier tasks may protect it (a
        backbone frozen since, a regularizer made to load their state); if they do not, the
        next ``consolidate`` says so."""
        params = checked_selection(self.model, params)
        if isinstance(params, tuple) and not params:
            select_parameters(self.model, params)  # (names of nothing: its error)
        return params

    @property
    def fisher(self) -> dict[str, Tensor]:
        """A copy of the accumulated diagonal Fisher ``A`` (empty before the first
        ``consolidate``); the state changes through ``consolidate`` and ``load_state_dict``
        only."""
        return {name: a.clone() for name, a in self._precision.items()}

    @property
    def anchor(self) -> dict[str, Tensor]:
        """A copy of the centre ``μ`` of the penalty (online mode: the parameters at the last
        task)."""
        return {name: mu.clone() for name, mu in self._center.items()}

    @torch.inference_mode(False)  # as fisher_diagonal: the state is made of ordinary tensors
    def consolidate(
        self,
        data: Iterable[Any],
        output_fn: Callable[[Any], Tensor] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        **fisher_kwargs: Any,
    ) -> dict[str, Tensor]:
        """Compute this task's Fisher on ``data`` and fold it, with the current parameters as
        anchor, into the penalty. Returns this task's Fisher.

        Parameters new since the last ``consolidate`` (a head added for this task) join with
        no Fisher from the earlier tasks, which did not depend on them: the same state as if
        they had been there all along, unused. Those protected before and frozen since
        (``requires_grad=False``: an old task's head, a backbone frozen while a head is
        fine-tuned) still get this task's Fisher, through which the task may depend on them
        (a frozen backbone does; an old head the task's ``output_fn`` leaves out gets zeros):
        their ``requires_grad`` is set for the computation and restored after. The others
        protected before must still be selected, with the same shapes (else ``ValueError``,
        before any computation).

        ``output_fn`` (the logits from the model's output: task classes, a sequence's
        positions), ``generator`` (the draws of ``method="sample"``) and ``progress`` (a
        progress bar) are as in :func:`ewc_reg.fisher_diagonal`, and so are the extra keyword
        arguments, which go to it: ``chunk_size``, ``backend``, ``memory_budget`` and
        ``max_exact_vectors``. The settings (``n_samples``, ``method``, ...) are the
        regularizer's attributes, not arguments here (``TypeError``, as for unknown names).
        If anything fails the regularizer is unchanged (in a distributed run: on every rank).
        """
        _check_fisher_kwargs(fisher_kwargs)
        selection, selected, frozen = self._selection(self.params, self._precision)
        self._check_still_protected({**selected, **frozen}, "consolidate")
        if frozen:  # (by name, unfrozen for the computation)
            selection = (*selected, *frozen)
        try:
            for p in frozen.values():
                p.requires_grad_(True)
            fisher = fisher_diagonal(
                self.model,
                data,
                self.method,
                n_samples=self.n_samples,
                mc_samples=self.mc_samples,
                likelihood=self.likelihood,
                output_fn=output_fn,
                generator=generator,
                progress=progress,
                params=selection,
                process_group=self.process_group,
                distributed=self.distributed,
                **fisher_kwargs,
            )
        finally:
            for p in frozen.values():
                p.requires_grad_(False)
        params = dict(self.model.named_parameters())
        self._move_to(params)  # (to the model's device and dtypes, if it moved since)
        theta = {name: params[name].detach().to(f.dtype) for name, f in fisher.items()}
        if self.mode == "separate" and self._precision:
            precision, center, offset = self._merge_separate(fisher, theta)
        else:  # online, or the first task of either mode
            precision = {
                n: self.gamma * self._precision[n] + f if n in self._precision else f
                for n, f in fisher.items()
            }
            center = {n: t.clone() for n, t in theta.items()}
            first = next(iter(fisher.values()))
            offset = torch.zeros((), dtype=first.dtype, device=first.device)
        self._precision, self._center, self._offset = precision, center, offset
        self._num_tasks += 1
        stored = {id(a) for a in precision.values()}  # (the first task's Fisher is A itself)
        return {name: f.clone() if id(f) in stored else f for name, f in fisher.items()}

    def _selection(
        self, params: ParamSelection, protected: Iterable[str]
    ) -> tuple[ParamSelection, dict[str, Tensor], dict[str, Tensor]]:
        """``params`` (a checked one) for :func:`~ewc_reg.fisher_diagonal` now, the parameters
        it selects, and the ``protected`` ones frozen since (``requires_grad=False``, not
        selected). A tuple of names loses its frozen protected names (naming a frozen
        parameter is an error of :func:`~ewc_reg.fisher.select_parameters`, raised here for
        the others). The selection may be empty (everything frozen: ``consolidate``'s
        ``fisher_diagonal`` says so when nothing is frozen and protected either)."""
        named = dict(self.model.named_parameters())
        frozen_names = {n for n in protected if n in named and not named[n].requires_grad}
        if isinstance(params, tuple):
            params = tuple(name for name in params if name not in frozen_names)
        selected = selected_parameters(self.model, params)
        frozen = {n: named[n] for n in frozen_names if n not in selected}
        return params, selected, frozen

    def _check_still_protected(self, selected: dict[str, Tensor], where: str) -> None:
        """``ValueError`` (from ``where``) when a parameter protected by the earlier tasks is
        no longer ``selected`` or has another shape (new parameters are welcome)."""
        gone = sorted(set(self._precision) - set(selected))
        if gone:
            missing = (
                "selected by params= (or removed" if where == "consolidate" else "there (removed"
            )
            raise ValueError(
                f"{where}: parameters {gone} are protected by the earlier tasks but no longer "
                f"{missing} from the model); keep them in params= (frozen ones may stay), or "
                "choose the protected parameters with params= from the start"
            )
        for name, a in self._precision.items():
            if a.shape != selected[name].shape:
                raise ValueError(
                    f"{where}: parameter {name!r} has shape {tuple(selected[name].shape)}, but "
                    f"the earlier tasks protect it with shape {tuple(a.shape)}"
                )

    def _merge_separate(
        self, fisher: dict[str, Tensor], theta: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        assert self._offset is not None
        precision, center = {}, {}
        offset = self.gamma * self._offset
        for name, f in fisher.items():
            if name not in self._precision:  # new: no earlier quadratic, nothing to offset
                precision[name], center[name] = f, theta[name].clone()
                continue
            old_a = self.gamma * self._precision[name]
            old_mu = self._center[name]
            a = old_a + f
            mu = torch.where(a > 0, (old_a * old_mu + f * theta[name]) / a, theta[name])
            term = (old_a * (old_mu - mu).pow(2) + f * (theta[name] - mu).pow(2)).sum()
            offset = offset + term.to(offset.device, offset.dtype)
            precision[name], center[name] = a, mu
        first = next(iter(precision.values()))  # (c kept on the first's device, in its dtype)
        return precision, center, offset.to(first.device, first.dtype)

    def penalty(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        r""":math:`\frac{\lambda}{2}\big(\sum_i A_i(\theta_i-\mu_i)^2 + c\big)`, differentiable
        in the model's current parameters; a zero tensor before the first ``consolidate``.
        When the model has moved to another device or dtype since, ``A``, ``μ`` and ``c``
        follow it (once). ``ValueError`` when a protected parameter has been removed or
        reshaped.

        ``params``: tensors that stand for the model's parameters, by name, in a functional
        training loop, where the loss is not taken with the registered parameters
        (``torch.func.functional_call(model, params, x)``, MAML's fast weights): the penalty
        is then of these (every protected name must be there, with its parameter's shape,
        dtype and device; other names are ignored).
        Without it the penalty reads the registered parameters, and its gradient reaches
        them, not the tensors the loss is taken with. Inside ``torch.func`` transforms
        (``grad``, ``vmap``, ...) and forward-mode AD it is computed by plain operations.

        For its gradient alone, :meth:`add_penalty_grad` after ``loss.backward()`` is faster."""
        if not self._precision:
            first = next(self.model.parameters(), None)
            if first is None:
                return torch.zeros(())
            return torch.zeros((), dtype=first.dtype, device=first.device)
        if params is not None:
            params = self._checked_stand_ins(params)
        return self._with_operands(
            "penalty",
            lambda current, precision, center: ewc_penalty(
                current, precision, center, self.strength, self._offset
            ),
            params,
        )

    def _checked_stand_ins(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``params`` of :meth:`penalty`, checked: a mapping from names to tensors that holds
        every protected name, each shaped as its parameter (else ``TypeError`` or
        ``ValueError``)."""
        if not isinstance(params, Mapping):
            raise TypeError(
                f"penalty(params=...) takes a mapping from parameter names to tensors, got "
                f"{type(params).__name__}"
            )
        missing = sorted(set(self._precision) - set(params))
        if missing:
            raise ValueError(
                f"penalty(params=...) lacks parameters {missing}, which the earlier tasks "
                "protect; pass every protected parameter (reg.fisher's names)"
            )
        registered = dict(self.model.named_parameters())
        for name, a in self._precision.items():
            t = params[name]
            if not isinstance(t, Tensor) or t.shape != a.shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"penalty(params=...): {name!r} must be a tensor of shape "
                    f"{tuple(a.shape)}, got {got}"
                )
            # (the state follows the model, not its stand-ins: one of another dtype or device
            # would move it there, rounded, or destroy it on "meta")
            p = registered.get(name, a)  # (a removed parameter: the state's own)
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"penalty(params=...): {name!r} must have its parameter's dtype and device, "
                    f"{p.dtype} on {p.device}, got {t.dtype} on {t.device}"
                )
        return dict(params)

    @torch.inference_mode(False)  # (.grad set here must not be an inference tensor)
    def add_penalty_grad(self) -> None:
        r"""Add the penalty's gradient :math:`\lambda A(\theta - \mu)` to the protected
        parameters' ``.grad`` (setting those that are ``None``): the gradient that adding
        :meth:`penalty` to the loss would give, without its graph and in two ``foreach``
        kernels instead of the penalty node's five (see :mod:`ewc_reg._penalty`; its value is not
        computed).

        Call it after ``loss.backward()`` and before ``optimizer.step()`` (with a
        ``GradScaler``, after ``scaler.unscale_(optimizer)``), once per step: with gradient
        accumulation, after the last micro-batch's ``backward()`` only (each call adds the
        whole gradient; a loss divided by the number of micro-batches leaves it undivided)::

            loss = criterion(model(x), y)
            loss.backward()
            reg.add_penalty_grad()
            optimizer.step()

        Nothing happens before the first ``consolidate``. Parameters without ``requires_grad``
        are left alone; errors as :meth:`penalty`'s. Under ``torch.inference_mode()`` too, the
        gradients it sets are ordinary tensors (a later ``backward()`` accumulates into them)."""
        if self._precision:
            self._with_operands(
                "add_penalty_grad",
                lambda current, precision, center: add_penalty_grad(
                    current, precision, center, self.strength
                ),
            )

    def _with_operands(
        self,
        where: str,
        use: Callable[[list[Tensor], list[Tensor], list[Tensor]], Any],
        stand_ins: dict[str, Tensor] | None = None,
    ) -> Any:
        """``use(θ, A, μ)`` over the protected parameters (or their ``stand_ins``, checked by
        :meth:`_checked_stand_ins`), with ``A``, ``μ`` and ``c`` moved to their devices and
        dtypes first if they have changed since (once: the dtypes ``consolidate`` would give
        them); a protected parameter removed or reshaped since is reported as such
        (``ValueError``, from ``where``): a reshaped one by comparing shapes (broadcasting
        would hide a head of one unit grown in place), a removed one only on the
        ``KeyError``, which costs the training step nothing."""
        params = dict(self.model.named_parameters()) if stand_ins is None else stand_ins
        names = list(self._precision)
        try:
            current = [params[n] for n in names]
            precision = [self._precision[n] for n in names]
            if any(
                p.shape != a.shape
                or p.device != a.device
                or (p.dtype != a.dtype and accumulation_dtype(p.dtype) != a.dtype)
                for p, a in zip(current, precision)
            ):  # (one pass over the parameters in the common case)
                if any(p.shape != a.shape for p, a in zip(current, precision)):
                    self._check_still_protected(params, where)
                self._move_to(params)  # the model moved or changed dtype since (once)
                precision = [self._precision[n] for n in names]
            return use(current, precision, [self._center[n] for n in names])
        except (KeyError, RuntimeError):
            self._check_still_protected(params, where)
            raise

    @torch.inference_mode(False)  # (the state is made of ordinary tensors, as consolidate's)
    def _move_to(self, params: dict[str, Tensor]) -> None:
        """Put ``A`` and ``μ`` on their parameters' devices, in the dtypes ``consolidate``
        would give them now, and ``c`` on the first one's."""

        def moved(t: Tensor, p: Tensor) -> Tensor:
            return t.to(p.device, accumulation_dtype(p.dtype))

        self._precision = {n: moved(a, params[n]) for n, a in self._precision.items()}
        self._center = {n: moved(m, params[n]) for n, m in self._center.items()}
        if self._offset is not None and self._precision:
            first = next(iter(self._precision.values()))
            self._offset = self._offset.to(first.device, first.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, task count, Fisher, anchors and offset.

        The settings include ``params``: ``None``, the list of names, or for a predicate the
        string ``"predicate"`` (a function cannot be saved; the regularizer that loads the
        state must be made with the same predicate). The state holds tensors, numbers,
        strings, lists and dicts only: ``torch.load(..., weights_only=True)`` reads it."""
        if self.params is None or callable(self.params):
            params = None if self.params is None else _PREDICATE
        else:
            params = list(self.params)
        return {
            "settings": {**{key: getattr(self, key) for key in _SETTINGS}, "params": params},
            "num_tasks": self.num_tasks,
            "fisher": {n: t.clone() for n, t in self._precision.items()},
            "anchor": {n: t.clone() for n, t in self._center.items()},
            "offset": None if self._offset is None else self._offset.clone(),
        }

    @torch.inference_mode(False)  # (the state is made of ordinary tensors, as consolidate's)
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Tensors move to the model's parameters' devices and
        take the dtypes ``consolidate`` would give them (the parameter's, at least float32).
        The state's settings replace the regularizer's, ``params`` included (names, or
        ``None``); settings missing from ``state`` (``params`` in a state saved before it was
        recorded) keep their current values. A state made with a predicate ``params=``
        (``"predicate"``) keeps this regularizer's, which must be a predicate too, the same
        one.

        Raises ``ValueError`` (leaving the regularizer unchanged) when the state is malformed:
        unknown entries or settings, a bad setting or task count (0 with a Fisher), Fisher or
        anchor entries that are not finite dense floating-point tensors shaped like their
        parameters (or a negative Fisher), parameters the model lacks or that the restored
        ``params`` does not select, an offset that is not one finite number >= 0; or when the
        state was made with a predicate
        and this regularizer's ``params`` is not one.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        keys = {"settings", "num_tasks", "fisher", "anchor", "offset"}
        if set(state) != keys:
            missing, unknown = sorted(keys - set(state)), sorted(set(state) - keys)
            raise ValueError(f"state_dict has missing entries {missing}, unknown {unknown}")
        settings = state["settings"]
        if not isinstance(settings, dict) or set(settings) - {*_SETTINGS, "params"}:
            raise ValueError(
                "state_dict 'settings' must be a dict with keys among "
                f"{[*_SETTINGS, 'params']}, got {settings!r}"
            )
        checked = {key: _SETTINGS[key](settings.get(key, getattr(self, key))) for key in _SETTINGS}
        selection = self._params_from_state(settings)
        num_tasks = state["num_tasks"]
        integer = isinstance(num_tasks, numbers.Integral) and not isinstance(num_tasks, bool)
        if not integer or num_tasks < 0:
            raise ValueError(f"state_dict 'num_tasks' must be an integer >= 0, got {num_tasks!r}")
        fisher, anchor = state["fisher"], state["anchor"]
        if not isinstance(fisher, dict) or not isinstance(anchor, dict):
            raise ValueError("state_dict 'fisher' and 'anchor' must be dicts of tensors by name")
        if set(fisher) != set(anchor):
            raise ValueError(
                "state_dict 'fisher' and 'anchor' name different parameters: only in 'fisher' "
                f"{sorted(set(fisher) - set(anchor))}, only in 'anchor' "
                f"{sorted(set(anchor) - set(fisher))}"
            )
        params = dict(self.model.named_parameters())
        unknown = sorted(set(fisher) - set(params))
        if unknown:
            raise ValueError(
                f"state_dict has Fisher entries for parameters the model lacks: {unknown}; "
                f"the model's parameters are {sorted(params)}"
            )
        # (frozen names the state does not protect are left to the next consolidate, as
        # when params= is set)
        named = set(selection) if isinstance(selection, tuple) else set()
        _, selected, frozen = self._selection(selection, {*fisher, *named})
        unselected = sorted(set(fisher) - set(selected) - set(frozen))
        if unselected:
            raise ValueError(
                f"state_dict protects parameters {unselected} that its params= (or, in a state "
                "without one, this regularizer's) does not select (the next consolidate would "
                "fail); make it with params= selecting them"
            )
        for name in fisher:
            for what, t in (("fisher", fisher[name]), ("anchor", anchor[name])):
                _check_state_tensor(what, name, t, params[name])
        offset = state["offset"]
        if fisher:
            one = offset.numel() == 1 if isinstance(offset, Tensor) else True
            number = isinstance(offset, (Tensor, numbers.Real)) and not isinstance(offset, bool)
            if not (one and number):
                raise ValueError(f"state_dict 'offset' must be one number, got {offset!r}")
            if not (math.isfinite(float(offset)) and float(offset) >= 0):
                raise ValueError(
                    f"state_dict 'offset' must be finite and >= 0 (a sum of squares), got "
                    f"{offset!r}"
                )
            if num_tasks < 1:
                raise ValueError("state_dict 'num_tasks' must be >= 1 when 'fisher' is not empty")
        elif offset is not None:
            raise ValueError("state_dict 'offset' must be None when 'fisher' is empty")
        # (all checked: from here on nothing fails)
        for key, value in checked.items():
            setattr(self, key, value)
        self.params = selection
        self._num_tasks = int(num_tasks)

        def own(t: Tensor, name: str) -> Tensor:
            p = params[name]
            return t.detach().to(p.device, accumulation_dtype(p.dtype), copy=True)

        self._precision = {n: own(t, n) for n, t in fisher.items()}
        self._center = {n: own(t, n) for n, t in anchor.items()}
        if fisher:
            first = next(iter(self._precision.values()))
            self._offset = torch.as_tensor(float(offset), dtype=first.dtype, device=first.device)
        else:
            self._offset = None

    def _params_from_state(self, settings: dict[str, Any]) -> ParamSelection:
        """The ``params`` that a state's ``settings`` restore, checked (``ValueError``)."""
        if "params" not in settings:  # (a state saved before params were recorded)
            return self.params
        saved = settings["params"]
        if isinstance(saved, str) and saved == _PREDICATE:
            if not callable(self.params):
                raise ValueError(
                    "state_dict was made with a predicate params=, which a state cannot hold; "
                    "make this regularizer with the same predicate (params=...) to load it"
                )
            return self.params
        names = isinstance(saved, (list, tuple)) and all(isinstance(n, str) for n in saved)
        if saved is not None and not names:
            raise ValueError(
                "state_dict settings 'params' must be None, a list of parameter names or "
                f"{_PREDICATE!r}, got {saved!r:.80}"
            )
        return self._checked_params(saved)

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={getattr(self, key)!r}" for key in _SETTINGS)
        return f"EWCRegularizer({settings}, num_tasks={self.num_tasks})"


def _check_state_tensor(what: str, name: str, t: Any, param: Tensor) -> None:
    """``ValueError`` unless ``t`` (a Fisher or anchor entry of a state) is a finite dense
    (strided) floating-point tensor shaped like ``param`` (a Fisher: and not negative)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.layout != torch.strided:
        kind = (
            type(t).__name__
            if not isinstance(t, Tensor)
            else f"a tensor of {t.dtype}, {str(t.layout).removeprefix('torch.')}"
        )
        raise ValueError(
            f"state_dict {what} for {name!r} must be a dense floating-point tensor, got {kind}"
        )
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(
            f"state_dict {what} for {name!r} has shape {tuple(t.shape)}, but the parameter has "
            f"shape {tuple(param.shape)}"
        )
    if t.is_meta:  # (no values to load: its checks below could not read any)
        raise ValueError(f"state_dict {what} for {name!r} is on the meta device: it has no values")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"state_dict {what} for {name!r} has NaN or Inf entries")
    if what == "fisher" and bool((t < 0).any()):
        raise ValueError(f"state_dict fisher for {name!r} has negative entries")


def _check_fisher_kwargs(kwargs: dict[str, Any]) -> None:
    """``TypeError`` for a keyword argument of ``consolidate`` that is neither its own nor one
    of :data:`_FISHER_EXTRAS` (fisher_diagonal would name itself in the error): a setting of
    the regularizer's, or a misspelt name."""
    settings = sorted(set(kwargs) & set(_SETTING_NAMES))
    if settings:
        raise TypeError(
            f"consolidate() takes no {settings}: they are settings of the regularizer; "
            f"set them before consolidating, e.g. reg.{settings[0]} = ..."
        )
    for name in kwargs:
        if name not in _FISHER_EXTRAS:
            own = ["output_fn", "generator", "progress", *_FISHER_EXTRAS]
            close = difflib.get_close_matches(name, own, n=1)
            setting = _misspelt_setting(name)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            elif setting:
                hint = f"; did you mean the setting {setting!r} (reg.{setting} = ...)?"
            else:
                hint = ""
            raise TypeError(
                f"consolidate() got an unexpected keyword argument {name!r}{hint} "
                f"(it takes {own})"
            )


def _misspelt_setting(name: str) -> str | None:
    """The setting ``name`` looks like a misspelling of (``n_sample``, ``strehgth``), if any:
    a new attribute so named would set nothing the regularizer reads. A setting's name with
    more after it (``strengths``, ``modes``: a subclass's schedule) is taken for the
    caller's own."""
    if name in _SETTING_NAMES or name.startswith(_SETTING_NAMES):
        return None
    close = difflib.get_close_matches(name, _SETTING_NAMES, n=1, cutoff=0.8)
    return close[0] if close else None


def _checked_flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def _checked_group(group: Any) -> dist.ProcessGroup | None:
    """``group`` if it is ``None`` or a ``torch.distributed`` process group (else
    ``TypeError``); whether it can be used is checked by ``consolidate``."""
    kind = getattr(dist, "ProcessGroup", None)  # (absent where torch.distributed is)
    if group is not None and (kind is None or not isinstance(group, kind)):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup or None, got "
            f"{type(group).__name__}"
        )
    return group
