"""EWCRegularizer: penalty values and gradients, both modes, persistence, atomicity."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ewc_reg import MODES, EWCRegularizer, fisher_diagonal

from .models import mlp


def task_data(seed: int, n: int = 12, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def perturb(model, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_penalty_is_zero_before_consolidate():
    model = mlp()
    reg = EWCRegularizer(model, strength=3.0)
    pen = reg.penalty()
    assert pen.shape == () and pen.item() == 0.0 and pen.dtype == torch.float64
    assert reg.fisher == {} and reg.num_tasks == 0


def test_penalty_zero_at_anchor_with_gradient_strength_f_delta():
    model = mlp()
    reg = EWCRegularizer(model, strength=7.5)
    fisher = reg.consolidate(task_data(0))
    assert reg.penalty().item() == 0.0
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, 1)
    pen = reg.penalty()
    pen.backward()
    expected = 0.0
    for n, p in model.named_parameters():
        delta = p.detach() - anchor[n]
        torch.testing.assert_close(p.grad, 7.5 * fisher[n] * delta, rtol=1e-12, atol=1e-15)
        expected += 0.5 * 7.5 * (fisher[n] * delta**2).sum().item()
    assert pen.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_online_recursion(gamma):
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, mode="online", gamma=gamma)
    f1 = reg.consolidate(task_data(0))
    perturb(model, 1)
    f2 = reg.consolidate(task_data(2))
    perturb(model, 3)
    f3 = reg.consolidate(task_data(4))
    for n in f1:
        want = gamma * (gamma * f1[n] + f2[n]) + f3[n]
        torch.testing.assert_close(reg.fisher[n], want, rtol=1e-12, atol=0)
        torch.testing.assert_close(reg.anchor[n], dict(model.named_parameters())[n].detach())
    assert reg.num_tasks == 3


@given(gamma=st.sampled_from([1.0, 0.7]), tasks=st.integers(1, 4))
@settings(max_examples=8, deadline=None)
def test_separate_mode_equals_naive_per_task_sum(gamma, tasks):
    """Σ_t γ^{T−t} F_t (θ − θ_t)²: compact form equals the naive sum in value and gradient."""
    model = mlp()
    reg = EWCRegularizer(model, strength=3.0, mode="separate", gamma=gamma)
    stored = []
    for t in range(tasks):
        perturb(model, 10 + t)
        fisher = reg.consolidate(task_data(t))
        stored.append((fisher, {n: p.detach().clone() for n, p in model.named_parameters()}))
    perturb(model, 99)
    params = dict(model.named_parameters())
    naive = sum(
        gamma ** (tasks - 1 - t) * (f[n] * (params[n] - a[n]) ** 2).sum()
        for t, (f, a) in enumerate(stored)
        for n in f
    ) * 1.5
    compact = reg.penalty()
    assert compact.item() == pytest.approx(naive.item(), rel=1e-10)
    g_naive = torch.autograd.grad(naive, list(params.values()))
    g_compact = torch.autograd.grad(compact, list(params.values()))
    for a, b in zip(g_compact, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    for n in params:  # reg.fisher is the accumulated A = Σ γ^{T−t} F_t
        want = sum(gamma ** (tasks - 1 - t) * f[n] for t, (f, _) in enumerate(stored))
        torch.testing.assert_close(reg.fisher[n], want, rtol=1e-12, atol=0)


def test_separate_mode_memory_does_not_grow():
    model = mlp()
    reg = EWCRegularizer(model, mode="separate")
    for t in range(3):
        perturb(model, t)
        reg.consolidate(task_data(t))
        state = reg.state_dict()
        assert len(state["fisher"]) == len(list(model.parameters()))


def test_state_dict_round_trip_resumes_identically():
    model = mlp()
    reg = EWCRegularizer(model, strength=4.0, method="empirical", mode="separate", gamma=0.9)
    reg.consolidate(task_data(0))
    perturb(model, 1)
    reg.consolidate(task_data(1))
    perturb(model, 2)
    state = reg.state_dict()
    fresh = EWCRegularizer(model)  # default settings are replaced by the state's
    fresh.load_state_dict(state)
    assert fresh.penalty().item() == reg.penalty().item()
    assert (fresh.method, fresh.mode, fresh.gamma, fresh.strength, fresh.num_tasks) == (
        "empirical", "separate", 0.9, 4.0, 2
    )
    # saving through torch.save works, and continuing gives identical results
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = EWCRegularizer(model)
    again.load_state_dict(torch.load(buffer))
    reg.consolidate(task_data(3))
    again.consolidate(task_data(3))
    assert again.penalty().item() == reg.penalty().item()
    # the state is a copy: later changes to the regularizer do not leak into it
    assert state["fisher"].keys() == reg.fisher.keys()
    assert any(not torch.equal(state["fisher"][n], reg.fisher[n]) for n in reg.fisher)


def test_load_state_dict_rejects_other_parameters_and_keeps_state():
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(task_data(0))
    good = reg.state_dict()
    renamed = reg.state_dict()
    renamed["fisher"] = {"x." + n: t for n, t in renamed["fisher"].items()}
    renamed["anchor"] = {"x." + n: t for n, t in renamed["anchor"].items()}
    with pytest.raises(ValueError, match="lacks"):
        reg.load_state_dict(renamed)
    reshaped = reg.state_dict()
    reshaped["fisher"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        reg.load_state_dict(reshaped)
    bad_setting = reg.state_dict()
    bad_setting["settings"]["mode"] = "offline"
    with pytest.raises(ValueError, match="mode"):
        reg.load_state_dict(bad_setting)
    with pytest.raises(ValueError, match="missing"):
        reg.load_state_dict({"fisher": {}})
    after = reg.state_dict()
    assert after["settings"] == good["settings"]
    assert all(torch.equal(after["fisher"][n], good["fisher"][n]) for n in good["fisher"])


def test_failed_consolidate_leaves_regularizer_unchanged():
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, method="empirical")
    reg.consolidate(task_data(0))
    perturb(model, 1)
    before = reg.state_dict()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="label 9"):
        reg.consolidate([(x, torch.tensor([0, 1, 9, 2]))])
    x[2, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        reg.consolidate([(x, torch.tensor([0, 1, 2, 2]))])
    after = reg.state_dict()
    assert after["num_tasks"] == 1
    for n in before["fisher"]:
        assert torch.equal(after["fisher"][n], before["fisher"][n])
        assert torch.equal(after["anchor"][n], before["anchor"][n])


def test_consolidate_matches_fisher_diagonal_and_passes_options():
    model = mlp()
    reg = EWCRegularizer(model, method="sample", mc_samples=3, n_samples=7)
    data = task_data(0)
    head = lambda o: o[:, :2]  # noqa: E731
    got = reg.consolidate(data, output_fn=head, generator=torch.Generator().manual_seed(1))
    want = fisher_diagonal(
        model, data, "sample", mc_samples=3, n_samples=7, output_fn=head,
        generator=torch.Generator().manual_seed(1),
    )
    for n in want:
        assert torch.equal(got[n], want[n])


def test_penalty_follows_the_model_device_dtype_and_is_a_tensor():
    model = mlp().float()
    reg = EWCRegularizer(model, strength=1.0)
    assert reg.penalty().dtype == torch.float32
    x = torch.randn(8, 6)
    reg.consolidate([(x, torch.randint(0, 5, (8,)))])
    perturb(model, 0)
    pen = reg.penalty()
    assert pen.dtype == torch.float32 and pen.requires_grad and pen.item() > 0


def test_the_state_follows_the_model_to_another_dtype():
    """After ``model.double()`` the state is float64 too, as consolidate would make it now
    (before, the penalty of a 1e-9 step came out 2.3e-19 in float32 against 1.25e-18), and
    after ``model.bfloat16()`` float32, the dtype sums of a bf16 model accumulate in."""
    model = mlp().float()
    reg = EWCRegularizer(model, strength=1.0)
    reg.consolidate([(torch.randn(8, 6), torch.randint(0, 5, (8,)))])
    fisher, anchor = reg.fisher, reg.anchor
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-9)
    want = 0.5 * sum(
        (fisher[n].double() * (p.detach() - anchor[n].double()).square()).sum()
        for n, p in model.named_parameters()
    )
    pen = reg.penalty()
    assert pen.dtype == torch.float64 and set(reg.fisher.values()).pop().dtype == torch.float64
    torch.testing.assert_close(pen, want, rtol=1e-12, atol=0)
    model.bfloat16()
    assert reg.penalty().dtype == torch.float32
    assert {a.dtype for a in reg.anchor.values()} == {torch.float32}


def test_separate_mode_keeps_the_offset_in_the_first_parameters_dtype():
    """A model of float32 and float64 layers: the offset stays in the first parameter's dtype,
    where a state loaded back puts it (the merge promoted it to float64, so a saved and
    reloaded regularizer's state differed from the original's: 0.0678058889427643 against
    0.06780588626861572)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(6, 4), nn.Linear(4, 5).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.tanh(self.first(x.float())).double())

    model = Mixed()
    reg = EWCRegularizer(model, strength=1.0, mode="separate")
    for seed in (0, 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        reg.consolidate(task_data(seed, classes=5))
    state = reg.state_dict()
    assert state["offset"].dtype == torch.float32 and state["offset"] > 0
    again = EWCRegularizer(model)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["offset"], state["offset"])
    assert torch.equal(again.penalty(), reg.penalty())


def test_consolidate_under_inference_mode_keeps_an_ordinary_trainable_state():
    """Consolidating from an evaluation loop: the state is made of ordinary tensors, so the
    penalty trains afterwards as usual, in both modes."""
    for mode in ("online", "separate"):
        model = mlp()
        reg = EWCRegularizer(model, strength=2.0, mode=mode)
        twin = EWCRegularizer(model, strength=2.0, mode=mode)
        for task in range(2):
            perturb(model, task)
            twin.consolidate(task_data(task))
            with torch.inference_mode():
                reg.consolidate(task_data(task))
                assert reg.penalty().item() == pytest.approx(twin.penalty().item(), rel=1e-12)
        state = reg.state_dict()
        assert not any(t.is_inference() for t in [*state["fisher"].values(), state["offset"]])
        assert not any(t.is_inference() for t in state["anchor"].values())
        perturb(model, 5)
        reg.penalty().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        twin.penalty().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=0)


class MultiHead(torch.nn.Module):
    """A trunk and task heads, their outputs side by side (task t reads units 3t..3t+2)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(6, 5).double()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 3).double() for _ in range(heads))

    def forward(self, x):
        hidden = torch.tanh(self.trunk(x))
        return torch.cat([head(hidden) for head in self.heads], dim=1)


def task_head(task: int):
    return lambda out: out[:, 3 * task : 3 * task + 3]


def perturb_named(model, seed: int, task: int) -> None:
    """Training on ``task`` as a change to the trunk and heads ``0..task``, the same for the
    parameters of the same name whatever else the model has (later heads stay as made)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.startswith("heads.") and int(name.split(".")[1]) > task:
                continue
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_a_head_added_for_a_new_task_joins_as_if_there_all_along(mode):
    """Growing a head per task (as multi-head continual learning does) gives the state of a
    model that had the head from the start, unused by the earlier tasks (Fisher 0 there)."""
    upfront = MultiHead(heads=3)
    grown = MultiHead(heads=1)
    grown.load_state_dict(upfront.state_dict(), strict=False)  # trunk and head 0
    made = [{k: v.clone() for k, v in head.state_dict().items()} for head in upfront.heads]
    regs = {
        model: EWCRegularizer(model, strength=3.0, mode=mode, gamma=0.5)
        for model in (upfront, grown)
    }
    for task in range(3):
        for model, reg in regs.items():
            if model is grown and task > 0:
                head = torch.nn.Linear(5, 3).double()
                head.load_state_dict(made[task])
                grown.heads.append(head)
            perturb_named(model, 10 * task, task)
            reg.consolidate(task_data(task, classes=3), output_fn=task_head(task))
    want, got = regs[upfront], regs[grown]
    assert list(got.fisher) == list(want.fisher)
    tight = {"rtol": 1e-12, "atol": 1e-15}
    # (to rounding, not bit for bit: with three heads, head 0's output gradient is a slice of the
    # concatenated outputs', laid out otherwise, and a sum over it may round otherwise: its
    # bias's Fisher was 1 ulp off on an AMD EPYC, equal on an Intel Xeon)
    torch.testing.assert_close(got.fisher, want.fisher, **tight)
    torch.testing.assert_close(got.anchor, want.anchor, **tight)
    torch.testing.assert_close(got.state_dict()["offset"], want.state_dict()["offset"])
    for model in regs:
        perturb_named(model, 99, 2)
    torch.testing.assert_close(got.penalty(), want.penalty(), **tight)
    assert want.penalty().item() > 0


def test_consolidate_refuses_to_drop_or_reshape_a_protected_parameter_before_computing():
    model = MultiHead(heads=1)
    reg = EWCRegularizer(model, strength=1.0)
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    before = reg.state_dict()
    never_read = object()  # (not data: the check comes first)
    reg.params = lambda name, p: name != "heads.0.bias"  # (dropped while still trainable)
    with pytest.raises(ValueError, match=r"\['heads.0.bias'\] are protected .* no longer"):
        reg.consolidate(never_read)
    reg.params = None
    model.heads[0] = torch.nn.Linear(5, 4).double()
    with pytest.raises(ValueError, match=r"'heads.0.weight' has shape \(4, 5\).* \(3, 5\)"):
        reg.consolidate(never_read)
    after = reg.state_dict()
    assert after["num_tasks"] == 1
    torch.testing.assert_close(after["fisher"], before["fisher"], rtol=0, atol=0)


@pytest.mark.parametrize("units", [1, 3])
def test_a_head_grown_or_shrunk_in_place_is_an_error_even_where_it_broadcasts(units):
    """A head of one unit grown to three, or three shrunk to one: the state's shapes broadcast
    against the new ones (before, penalty() pulled the new units to the old unit's anchor, and
    summed three rows' gradients into one, without an error)."""
    model = MultiHead(heads=1)
    model.heads[0] = torch.nn.Linear(5, units).double()
    reg = EWCRegularizer(model, strength=1.0)
    reg.consolidate(task_data(0, classes=units), output_fn=lambda out: out)
    model.heads[0] = torch.nn.Linear(5, 4 - units).double()
    reshaped = rf"parameter 'heads.0.weight' has shape \({4 - units}, 5\).*\({units}, 5\)"
    with pytest.raises(ValueError, match="^penalty: " + reshaped):
        reg.penalty()
    with pytest.raises(ValueError, match="^add_penalty_grad: " + reshaped):
        reg.add_penalty_grad()


def test_penalty_says_which_protected_parameter_changed_shape_or_went():
    model = MultiHead(heads=1)
    reg = EWCRegularizer(model, strength=1.0)
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    head = model.heads[0]
    model.heads[0] = torch.nn.Linear(5, 4).double()
    reshaped = r"^penalty: .*'heads.0.weight' has shape \(4, 5\).*\(3, 5\)"
    with pytest.raises(ValueError, match=reshaped):
        reg.penalty()
    del model.heads[0]
    with pytest.raises(ValueError, match=r"^penalty: .*'heads.0.bias'.* no longer there"):
        reg.penalty()
    model.heads.append(head)
    assert reg.penalty().item() == 0.0


def test_penalty_follows_the_model_to_another_device():
    """A model moved after consolidate (here to "meta", which needs no GPU; test_cuda.py moves
    one to CUDA and compares values) takes the penalty's state along, once, instead of failing
    on mixed devices."""
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, mode="separate")
    reg.consolidate(task_data(0))
    perturb(model, 1)
    reg.consolidate(task_data(1))
    model.to("meta")
    penalty = reg.penalty()
    assert penalty.device.type == "meta" and penalty.shape == ()
    state = reg.state_dict()
    tensors = [*state["fisher"].values(), *state["anchor"].values(), state["offset"]]
    assert {t.device.type for t in tensors} == {"meta"}
    penalty.backward()
    assert all(p.grad.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_consolidate_follows_the_model_to_another_device(mode, monkeypatch):
    """A model moved after consolidate (to "meta" here; test_cuda.py moves one to CUDA) and
    consolidated again before any penalty: the earlier tasks' state moves along before it is
    merged with the new Fisher (it stayed behind and the merge failed on mixed devices). The
    Fisher of a model on "meta" cannot be computed, so here it is ones on the parameters'
    device."""
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, mode=mode)
    reg.consolidate(task_data(0))
    model.to("meta")

    def ones(model, *args, **kwargs):
        return {n: torch.ones_like(p) for n, p in model.named_parameters()}

    monkeypatch.setattr("ewc_reg.regularizer.fisher_diagonal", ones)
    reg.consolidate(task_data(1))
    state = reg.state_dict()
    tensors = [*state["fisher"].values(), *state["anchor"].values(), state["offset"]]
    assert {t.device.type for t in tensors} == {"meta"} and reg.num_tasks == 2


def test_a_state_rebuilt_under_inference_mode_stays_ordinary():
    """A state loaded, or moved to the model's new dtype by the first penalty after
    ``model.float()``, inside ``torch.inference_mode()`` (an evaluation loop) is made of
    ordinary tensors, as consolidate's is: a double backward through the penalty works
    afterwards (inference tensors cannot be saved for backward)."""
    source = mlp()
    trained = EWCRegularizer(source, strength=2.0)
    trained.consolidate(task_data(0))
    loaded = EWCRegularizer(mlp(), strength=2.0)
    with torch.inference_mode():
        loaded.load_state_dict(trained.state_dict())
    moved_model = mlp()
    moved = EWCRegularizer(moved_model, strength=2.0)
    moved.consolidate(task_data(0))
    moved_model.float()
    with torch.inference_mode():
        moved.penalty()
    for reg in (loaded, moved):
        state = reg.state_dict()
        tensors = [*state["fisher"].values(), *state["anchor"].values(), state["offset"]]
        assert not any(t.is_inference() for t in tensors)
        perturb(reg.model, 3)
        params = list(reg.model.parameters())
        grads = torch.autograd.grad(reg.penalty(), params, create_graph=True)
        sum(g.sum() for g in grads).backward()  # (Hessian-vector products: λ A)
        fisher = reg.fisher
        for name, p in reg.model.named_parameters():
            torch.testing.assert_close(p.grad, 2.0 * fisher[name])


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_penalty_of_stand_ins_in_a_functional_training_loop(mode):
    """``penalty(params=...)``: the penalty of tensors that stand for the parameters (MAML's
    fast weights, ``functional_call``), value and gradient reaching them; without it the
    penalty read the registered parameters and the fast weights' gradient lacked it. Under
    ``torch.func.grad`` as well."""
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, mode=mode)
    reg.consolidate(task_data(0))
    perturb(model, 1)
    reg.consolidate(task_data(1))
    g = torch.Generator().manual_seed(7)
    fast = {
        n: (p.detach() + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for n, p in model.named_parameters()
    }
    with torch.no_grad():  # (the reference: the registered parameters set to the fast weights)
        saved = {n: p.clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(fast[n])
    want = reg.penalty()
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    got = reg.penalty(params=fast)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g_got, g_want in zip(torch.autograd.grad(got, list(fast.values())), want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=0)
    detached = {n: t.detach() for n, t in fast.items()}
    by_func = torch.func.grad(lambda ps: reg.penalty(params=ps))(detached)
    for g_func, g_want in zip(by_func.values(), want_grads):
        torch.testing.assert_close(g_func, g_want, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_penalty_stand_ins_are_checked():
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(task_data(0))
    named = dict(model.named_parameters())
    with pytest.raises(TypeError, match=r"mapping from parameter names to tensors, got list"):
        reg.penalty(params=list(named.values()))
    with pytest.raises(ValueError, match=r"lacks parameters \['0.bias'\]"):
        reg.penalty(params={n: p for n, p in named.items() if n != "0.bias"})
    with pytest.raises(ValueError, match=r"'0.bias' must be a tensor of shape \(8,\), got \(3,\)"):
        reg.penalty(params={**named, "0.bias": torch.zeros(3)})


@pytest.mark.parametrize(
    "stand_in",
    [
        lambda p: p.float(),
        lambda p: p.to(torch.int64),
        lambda p: p.to(torch.complex128),
        lambda p: p.to("meta"),
    ],
)
def test_penalty_stand_ins_of_another_dtype_or_device_are_refused_and_the_state_kept(stand_in):
    """Before, a stand-in of another dtype or device moved the whole state there (the state
    follows the model, not its stand-ins): a float32 one rounded a float64 state for good (the
    penalty at the anchor 9e-17, not 0), a complex one dropped nothing but made it complex, a
    "meta" one destroyed it."""
    model = mlp()  # (float64)
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(task_data(0))
    before = reg.state_dict()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"'0.weight' must have its parameter's dtype and device"):
        reg.penalty(params={**named, "0.weight": stand_in(named["0.weight"])})
    after = reg.state_dict()
    for key in ("fisher", "anchor"):
        assert all(torch.equal(after[key][n], t) for n, t in before[key].items())
        assert all(after[key][n].dtype == torch.float64 for n in before[key])
    assert reg.penalty().item() == 0.0  # (at the anchor, exactly)


@pytest.mark.parametrize("mode", ["online", "separate"])
@pytest.mark.parametrize("with_loss", [True, False])
def test_add_penalty_grad_gives_the_gradient_of_the_penalty_in_the_loss(mode, with_loss):
    """Across tasks, in both modes, after a loss's backward or alone (every ``.grad`` ``None``
    before), with a frozen parameter."""
    model = MultiHead(heads=2)
    reg = EWCRegularizer(model, strength=3.0, mode=mode)
    for task in range(2):
        reg.consolidate(task_data(task, classes=3), output_fn=task_head(task))
        perturb(model, 10 + task)
    model.trunk.bias.requires_grad_(False)
    x, y = task_data(5, classes=3)[0]

    def loss() -> torch.Tensor:
        if not with_loss:
            return torch.zeros((), dtype=torch.float64)
        return torch.nn.functional.cross_entropy(task_head(1)(model(x)), y)

    model.zero_grad()
    (loss() + reg.penalty()).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad()
    if with_loss:
        loss().backward()
    reg.add_penalty_grad()
    for name, p in model.named_parameters():
        if want[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-13, atol=1e-15)
    assert want["trunk.bias"] is None and want["trunk.weight"].abs().sum() > 0


def test_add_penalty_grad_under_inference_mode_sets_ordinary_gradients():
    """Before, the ``.grad`` it set under ``torch.inference_mode()`` was an inference tensor,
    and the next ``loss.backward()`` failed ("Inplace update to inference tensor")."""
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(task_data(0))
    perturb(model, 1)
    want = torch.autograd.grad(reg.penalty(), list(model.parameters()))
    with torch.inference_mode():
        reg.add_penalty_grad()
    x, y = task_data(1)[0]
    model.eval()  # (no dropout: the two losses below are one)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    plain = torch.autograd.grad(loss, list(model.parameters()))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for p, w, g in zip(model.parameters(), want, plain):
        assert not p.grad.is_inference() and p.grad.grad_fn is None
        torch.testing.assert_close(p.grad, w + g, rtol=1e-13, atol=1e-15)


def test_settings_given_as_str_subclasses_are_saved_as_plain_strings():
    """An enum's or NumPy's strings are kept as plain ``str``: before, the state kept them as
    given and ``torch.load(..., weights_only=True)`` refused it (``UnpicklingError``)."""
    import enum
    import io

    class Mode(str, enum.Enum):  # (str() of it is 'Mode.SEPARATE', its value 'separate')
        SEPARATE = "separate"

    numpy = pytest.importorskip("numpy")
    model = mlp()
    names = numpy.array([n for n, _ in model.named_parameters()])
    reg = EWCRegularizer(model, method=numpy.str_("empirical"), mode=Mode.SEPARATE, params=names)
    reg.consolidate(task_data(0))
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    settings = torch.load(buffer, weights_only=True)["settings"]
    assert (settings["mode"], settings["method"]) == ("separate", "empirical")
    assert settings["params"] == list(names)
    assert all(type(v) is str for v in (settings["mode"], settings["method"], *settings["params"]))


def test_add_penalty_grad_before_consolidate_and_after_a_change():
    model = MultiHead(heads=1)
    reg = EWCRegularizer(model)
    reg.add_penalty_grad()  # nothing to add yet
    assert all(p.grad is None for p in model.parameters())
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    model.heads[0] = torch.nn.Linear(5, 4).double()
    with pytest.raises(ValueError, match=r"^add_penalty_grad: .*'heads.0.weight' has shape"):
        reg.add_penalty_grad()


def test_add_penalty_grad_follows_the_model_to_another_device():
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0)
    reg.consolidate(task_data(0))
    model.to("meta")
    reg.add_penalty_grad()
    assert all(p.grad.device.type == "meta" for p in model.parameters())
    assert {t.device.type for t in reg.fisher.values()} == {"meta"}


def test_consolidate_on_inputs_only():
    """``exact`` needs no labels: a loader over a ``TensorDataset`` of inputs consolidates as
    the labelled data does; ``empirical`` says it needs them and leaves the state alone."""
    x = torch.cat([b[0] for b in task_data(0)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
    model = mlp()
    regs = [EWCRegularizer(m, strength=2.0) for m in (model, copy.deepcopy(model))]
    regs[0].consolidate(task_data(0))
    regs[1].consolidate(loader)
    torch.testing.assert_close(regs[1].fisher, regs[0].fisher, rtol=1e-12, atol=0)
    regs[1].method = "empirical"
    with pytest.raises(ValueError, match="needs the data's labels"):
        regs[1].consolidate(loader)
    assert regs[1].num_tasks == 1


def _malformed(state: dict, **changes) -> dict:
    """A copy of ``state`` with entries (``"fisher.0.weight"``: one tensor) replaced."""
    bad = {**state, "settings": dict(state["settings"]), "fisher": dict(state["fisher"])}
    for key, value in changes.items():
        if key.startswith("fisher."):
            bad["fisher"][key.removeprefix("fisher.")] = value
        else:
            bad[key] = value
    return bad


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_tasks": "x"}, "num_tasks"),
        ({"num_tasks": -1}, "num_tasks"),
        ({"offset": None}, "offset"),
        ({"offset": torch.zeros(3)}, "offset"),
        ({"offset": float("nan")}, "offset"),
        ({"offset": -5.0}, r"'offset' must be finite and >= 0"),
        ({"num_tasks": 0}, r"'num_tasks' must be >= 1 when 'fisher' is not empty"),
        ({"fisher.0.weight": torch.ones(8, 6).to_sparse()}, "dense floating-point tensor"),
        ({"fisher.0.weight": [[0.0]]}, "floating-point tensor, got list"),
        ({"fisher.0.weight": torch.ones(8, 6, dtype=torch.long)}, "floating-point tensor"),
        ({"fisher.0.weight": -torch.ones(8, 6, dtype=torch.float64)}, "negative"),
        ({"fisher.0.weight": torch.full((8, 6), float("nan"))}, "NaN"),
        ({"fisher.0.weight": torch.ones(8, 6, device="meta")}, "meta device"),  # (RuntimeError)
        ({"settings": {"strength": 1.0, "paramz": ["0.weight"]}}, "keys among"),
        ({"settings": {"params": ["0.weight"]}}, r"\['0\.bias', .*does not select"),
        ({"settings": {"params": ["nope"]}}, r"\['nope'\] are not parameters"),
        ({"settings": {"params": 3}}, "'params' must be None, a list of parameter names"),
        ({"settings": {"params": "predicate"}}, "made with a predicate params="),
        ({"extra": 1}, "unknown"),
        ({"anchor": {}}, r"only in 'fisher' \['0\.bias', '0\.weight', .*only in 'anchor' \[\]"),
    ],
)
def test_load_state_dict_checks_everything_before_changing_anything(changes, match):
    """A malformed state raises ``ValueError`` and leaves the regularizer as it was (before:
    settings were applied before the task count was read; a missing offset, a vector offset,
    an integer Fisher or a list loaded, and failed later)."""
    model = mlp()
    reg = EWCRegularizer(model, strength=2.0, method="empirical", mode="separate")
    reg.consolidate(task_data(0))
    before = reg.state_dict()
    other = EWCRegularizer(model, strength=7.0)
    with pytest.raises(ValueError, match=match):
        reg.load_state_dict(_malformed(before, **changes))
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(_malformed(before, **changes))
    assert (other.strength, other.method, other.num_tasks, other.fisher) == (7.0, "exact", 0, {})
    after = reg.state_dict()
    assert after["settings"] == before["settings"] and after["num_tasks"] == 1
    assert all(torch.equal(after["fisher"][n], before["fisher"][n]) for n in before["fisher"])


def test_load_state_dict_keeps_missing_settings_casts_dtypes_and_checks_params():
    model = mlp()
    reg = EWCRegularizer(model, strength=3.0, params=["4.weight", "4.bias"])
    reg.consolidate(task_data(0))
    state = reg.state_dict()
    del state["settings"]["likelihood"], state["settings"]["mode"]
    receiver = EWCRegularizer(model, likelihood="gaussian", mode="separate")
    receiver.load_state_dict(state)
    assert (receiver.likelihood, receiver.mode, receiver.strength) == ("gaussian", "separate", 3.0)
    wide = EWCRegularizer(model.float())  # a float64 state into a float32 model: float32
    wide.load_state_dict(reg.state_dict())
    assert all(a.dtype == torch.float32 for a in wide.fisher.values())
    assert wide.penalty().dtype == torch.float32
    older = reg.state_dict()  # (a state saved before params were recorded: the current one)
    del older["settings"]["params"]
    with pytest.raises(ValueError, match=r"its params= \(or, .*this regularizer's\) does not"):
        EWCRegularizer(model, params=["0.weight"]).load_state_dict(older)
    assert receiver.params == ("4.weight", "4.bias")  # (the state's, as the other settings)


def test_state_dict_records_params_and_a_resumed_regularizer_protects_the_same():
    """A head-only regularizer's state, loaded (through ``torch.load(weights_only=True)``) into
    one made without ``params=``, protects the head only at the next task too (before:
    ``params`` was not saved and the whole model was protected from then on)."""
    import io

    model = mlp()
    reg = EWCRegularizer(model, strength=3.0, params=["4.weight", "4.bias"])
    reg.consolidate(task_data(0))
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    resumed = EWCRegularizer(copy.deepcopy(model), strength=3.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.params == ("4.weight", "4.bias")
    perturb(model, 1)
    perturb(resumed.model, 1)
    reg.consolidate(task_data(1))
    resumed.consolidate(task_data(1))
    assert set(resumed.fisher) == {"4.weight", "4.bias"}
    torch.testing.assert_close(resumed.fisher, reg.fisher, rtol=0, atol=0)
    one = EWCRegularizer(model, params="4.weight")  # (one name: a 1-tuple, saved as a list)
    assert one.params == ("4.weight",)
    assert one.state_dict()["settings"]["params"] == ["4.weight"]
    assert EWCRegularizer(model).state_dict()["settings"]["params"] is None


def test_a_state_made_with_a_predicate_needs_a_predicate_to_load():
    """A predicate cannot be saved: the state says ``"predicate"``; a regularizer with a
    predicate keeps its own, any other refuses the state and stays as it was."""
    model = mlp()

    def head(name, p):
        return name.startswith("4.")

    reg = EWCRegularizer(model, strength=3.0, params=head)
    reg.consolidate(task_data(0))
    state = reg.state_dict()
    assert state["settings"]["params"] == "predicate"
    twin = EWCRegularizer(model, params=head)
    twin.load_state_dict(state)
    assert twin.params is head and twin.fisher.keys() == reg.fisher.keys()
    for params in (None, ["4.weight", "4.bias"]):
        other = EWCRegularizer(model, strength=7.0, params=params)
        with pytest.raises(ValueError, match=r"made with a predicate params=.*same predicate"):
            other.load_state_dict(state)
        assert (other.strength, other.num_tasks, other.fisher) == (7.0, 0, {})
        assert other.params == (params if params is None else tuple(params))


def test_consolidate_returns_a_fisher_of_its_own_and_properties_are_copies():
    """Changing the returned Fisher, or ``reg.fisher`` / ``reg.anchor``, in place does not
    change the penalty (before: the first task's returned Fisher was the stored one)."""
    for mode in MODES:
        model = mlp()
        reg = EWCRegularizer(model, mode=mode)
        fisher = reg.consolidate(task_data(0))
        perturb(model, 1)
        before = reg.penalty().item()
        fisher["0.weight"].zero_()
        reg.fisher["0.weight"].zero_()
        reg.anchor["0.weight"].zero_()
        assert reg.penalty().item() == before


def test_settings_take_numpy_numbers_and_are_not_arguments_of_consolidate():
    np = pytest.importorskip("numpy")
    model = mlp()
    reg = EWCRegularizer(model, strength=np.float32(1e5), n_samples=np.int64(5))
    assert (reg.strength, reg.n_samples) == (1e5, 5) and type(reg.n_samples) is int
    with pytest.raises(TypeError, match=r"settings of the regularizer.*reg.n_samples"):
        reg.consolidate(task_data(0), n_samples=3)
    for name in ("distributed", "process_group"):
        with pytest.raises(TypeError, match=rf"settings of the regularizer.*reg.{name}"):
            reg.consolidate(task_data(0), **{name: None})
    with pytest.raises(ValueError, match="nope"):
        reg.params = ["nope"]
    reg.params = (name for name in ["4.weight"])  # (an iterator: kept as a tuple)
    assert reg.params == ("4.weight",)
    assert set(reg.consolidate(task_data(0))) == {"4.weight"}


@pytest.mark.parametrize("selection", ["all", "names", "predicate"])
@pytest.mark.parametrize("mode", MODES)
def test_a_frozen_old_head_keeps_its_quadratic(mode, selection):
    """Freezing an old task's head (multi-head continual learning) is not an error: the new
    task's Fisher of the head is 0 (its output_fn leaves the head out), so its quadratic stays,
    decayed by gamma (online: anchored at its current value; separate: at its old centre);
    the other parameters get what they would get without the freezing."""
    model = MultiHead(heads=2)
    params = {
        "all": None,
        "names": [name for name, _ in model.named_parameters()],
        "predicate": lambda name, p: True,
    }[selection]
    reg = EWCRegularizer(model, strength=2.0, mode=mode, gamma=0.8, params=params)
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    first_fisher, first_anchor = reg.fisher, reg.anchor
    perturb_named(model, 1, task=1)
    twin_model = copy.deepcopy(model)
    twin = EWCRegularizer(twin_model, strength=2.0, mode=mode, gamma=0.8, params=params)
    twin.load_state_dict(reg.state_dict())
    for p in model.heads[0].parameters():
        p.requires_grad_(False)
    fisher = reg.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    twin.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    assert all(not f.any() for name, f in fisher.items() if name.startswith("heads.0."))
    assert not any(p.requires_grad for p in model.heads[0].parameters())  # (restored)
    for name, a in reg.fisher.items():
        if name.startswith("heads.0."):
            torch.testing.assert_close(a, 0.8 * first_fisher[name], rtol=1e-14, atol=0)
            centre = model.get_parameter(name) if mode == "online" else first_anchor[name]
            torch.testing.assert_close(reg.anchor[name], centre.detach(), rtol=1e-14, atol=0)
        else:
            torch.testing.assert_close(a, twin.fisher[name], rtol=1e-14, atol=0)
    perturb_named(model, 2, task=1)
    loss = reg.penalty()
    loss.backward()
    assert all(p.grad is None for p in model.heads[0].parameters())
    again = EWCRegularizer(model, params=params)  # (a state with frozen entries loads)
    again.load_state_dict(reg.state_dict())
    assert again.penalty().item() == loss.item()


@pytest.mark.parametrize("mode", MODES)
def test_a_backbone_frozen_for_a_task_gets_that_tasks_fisher(mode):
    """A trunk frozen while the next task's head is fine-tuned still shapes that task's
    likelihood: its Fisher from the task joins (before, it got zeros, and a frozen backbone
    later unfrozen kept 15% of its protection in the audit's example). The result equals
    that of a twin consolidated without freezing, and the flags are restored, also when the
    computation fails."""
    model = MultiHead(heads=2)
    reg = EWCRegularizer(model, strength=2.0, mode=mode, gamma=0.8)
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    perturb_named(model, 1, task=1)
    twin_model = copy.deepcopy(model)
    twin = EWCRegularizer(twin_model, strength=2.0, mode=mode, gamma=0.8)
    twin.load_state_dict(reg.state_dict())
    model.trunk.requires_grad_(False)

    def failing():
        yield task_data(1, classes=3)[0]
        raise RuntimeError("the loader failed")

    with pytest.raises(RuntimeError, match="the loader failed"):
        reg.consolidate(failing(), output_fn=task_head(1))
    assert not any(p.requires_grad for p in model.trunk.parameters())
    fisher = reg.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    want = twin.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert fisher["trunk.weight"].abs().min() > 0
    torch.testing.assert_close(fisher, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(reg.fisher, twin.fisher, rtol=1e-14, atol=0)
    torch.testing.assert_close(reg.anchor, twin.anchor, rtol=1e-14, atol=0)


@pytest.mark.parametrize("selection", ["name", "names", "predicate"])
def test_a_backbone_frozen_for_a_task_gets_its_fisher_whatever_params_is(selection):
    """Protecting the trunk by one name (a 1-tuple since) or by a predicate, then freezing it
    for the next task, consolidates as ``params=None`` and a list do (before: one name was
    refused as frozen, and the predicate selected nothing); a regularizer made to resume
    while it is frozen may name it (before: refused as frozen), and goes on identically."""
    params = {
        "name": "trunk.weight",
        "names": ["trunk.weight"],
        "predicate": lambda name, p: name.startswith("trunk."),
    }[selection]
    model = MultiHead(heads=2)
    reg = EWCRegularizer(model, strength=2.0, params=params)
    reg.consolidate(task_data(0, classes=3), output_fn=task_head(0))
    perturb_named(model, 1, task=1)
    twin = EWCRegularizer(copy.deepcopy(model), strength=2.0, params=params)
    twin.load_state_dict(reg.state_dict())
    model.trunk.requires_grad_(False)
    fisher = reg.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    want = twin.consolidate(task_data(1, classes=3), output_fn=task_head(1))
    assert set(fisher) == set(want) and fisher["trunk.weight"].abs().min() > 0
    torch.testing.assert_close(reg.fisher, twin.fisher, rtol=1e-14, atol=0)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    resumed = EWCRegularizer(model, strength=2.0, params=params)  # (frozen names: accepted)
    resumed.load_state_dict(reg.state_dict())
    reg.consolidate(task_data(2, classes=3), output_fn=task_head(1))
    resumed.consolidate(task_data(2, classes=3), output_fn=task_head(1))
    torch.testing.assert_close(resumed.fisher, reg.fisher, rtol=0, atol=0)


def test_a_frozen_name_the_earlier_tasks_do_not_protect_fails_at_consolidate():
    """Naming a frozen parameter is accepted when ``params=`` is set (the earlier tasks may
    protect it, as in a regularizer made to load their state), and is ``select_parameters``'
    error at ``consolidate`` when they do not, before any computation."""
    model = MultiHead(heads=1)
    model.trunk.requires_grad_(False)
    reg = EWCRegularizer(model, params=["trunk.weight", "heads.0.weight"])

    def untouched():
        raise AssertionError("the data was read")
        yield

    with pytest.raises(ValueError, match=r"\['trunk\.weight'\] have requires_grad=False"):
        reg.consolidate(untouched())
    assert reg.num_tasks == 0 and reg.fisher == {}
    with pytest.raises(ValueError, match="selected no parameters"):  # (names of nothing)
        EWCRegularizer(model, params=[])


def test_a_state_loads_into_a_model_with_every_parameter_frozen():
    """Evaluating the penalty of a frozen copy: its entries count as frozen, not unselected."""
    model = mlp()
    reg = EWCRegularizer(model)
    reg.consolidate(task_data(0))
    frozen = copy.deepcopy(model).requires_grad_(False)
    perturb(frozen, 1)
    copy_reg = EWCRegularizer(frozen)
    copy_reg.load_state_dict(reg.state_dict())
    perturb(model, 1)
    assert copy_reg.penalty().item() == reg.penalty().item()


def test_the_state_dict_holds_copies() -> None:
    """Editing a ``state_dict()``'s tensors (to reset it, say) leaves the regularizer as it
    is: the state changes only through ``consolidate`` and ``load_state_dict``."""
    torch.manual_seed(0)
    model = mlp()
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,)))]
    reg = EWCRegularizer(model, strength=1.0, mode="separate", gamma=0.5)
    reg.consolidate(data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    reg.consolidate(data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = reg.penalty().item()
    state = reg.state_dict()
    for t in [*state["fisher"].values(), *state["anchor"].values(), state["offset"]]:
        t.zero_()
    assert reg.penalty().item() == before != 0.0


def test_separate_mode_anchors_where_no_task_has_fisher_at_the_parameters() -> None:
    """Where ``A = 0`` (a dead unit) ``mode="separate"``'s centre is undetermined; it is the
    parameters at the last ``consolidate``, as in ``"online"`` mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    with torch.no_grad():  # (unit 0 feeds nothing: its weights' Fisher is 0)
        model[2].weight[:, 0].zero_()
    reg = EWCRegularizer(model, strength=1.0, mode="separate", gamma=0.0)
    reg.consolidate(data)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    reg.consolidate(data)
    assert torch.all(reg.fisher["0.weight"][0] == 0)
    torch.testing.assert_close(reg.anchor["0.weight"][0], model[0].weight[0].detach())
