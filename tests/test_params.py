"""``params=``: Fisher and penalty on a subset of the parameters (issue #5, part 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.engines import BACKENDS
from ewc_reg.fisher import select_parameters

from .reference import assert_close_dicts, brute_force_fisher

METHODS = ("exact", "sample", "empirical", "batched")


class Tripwire(torch.autograd.Function):
    """Identity whose backward fails: proves that no gradient flows through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("tripwire: a gradient was computed through the backbone")


class Net(nn.Module):
    def __init__(self, tripwire: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.tripwire = tripwire

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        return self.head(Tripwire.apply(h) if self.tripwire else h)


def make_data(n_batches: int = 3, batch: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,)))
        for _ in range(n_batches)
    ]


def fisher(model: nn.Module, data, method: str, **kwargs) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return fisher_diagonal(model, data, method, generator=gen, mc_samples=2, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_names_select_the_same_entries_as_the_full_fisher(method: str) -> None:
    model, data = Net().double(), make_data()
    full = fisher(model, data, method)
    names = ["head.weight", "backbone.0.bias"]
    part = fisher(model, data, method, params=names)
    assert list(part) == ["backbone.0.bias", "head.weight"]  # named_parameters() order
    for name in names:
        torch.testing.assert_close(part[name], full[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_predicate_selects_and_skips_frozen(method: str) -> None:
    model, data = Net().double(), make_data()
    full = fisher(model, data, method)
    model.head.bias.requires_grad_(False)
    part = fisher(model, data, method, params=lambda name, p: name.startswith("head."))
    assert list(part) == ["head.weight"]
    torch.testing.assert_close(part["head.weight"], full["head.weight"], rtol=1e-12, atol=0)
    assert model.head.bias.requires_grad is False


def test_frozen_parameters_are_skipped_by_default() -> None:
    model, data = Net().double(), make_data()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert list(fisher(model, data, "exact")) == ["head.weight", "head.bias"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_unselected_parameters_cost_no_backward(method: str, backend: str) -> None:
    model, data = Net(tripwire=True).double(), make_data()
    head = fisher(model, data, method, params=["head.weight", "head.bias"], backend=backend)
    assert set(head) == {"head.weight", "head.bias"}
    with pytest.raises(RuntimeError, match="tripwire"):
        fisher(model, data, method, params=["backbone.0.weight"], backend=backend)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert set(fisher(model, data, method, backend=backend)) == {"head.weight", "head.bias"}


def test_unknown_names_list_the_valid_ones() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"\['head\.wieght'\].*backbone\.0\.weight"):
        fisher_diagonal(model, make_data(), params=["head.wieght", "head.bias"])
    with pytest.raises(ValueError, match=r"head\.wieght"):
        EWCRegularizer(model, params=["head.wieght"])


def test_naming_a_frozen_parameter_is_an_error() -> None:
    """An error of ``select_parameters`` (so of ``fisher_diagonal``); a regularizer accepts
    the name, since the earlier tasks may protect it (its ``consolidate`` checks: see
    ``test_regularizer.py``)."""
    model = Net()
    model.head.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"head\.bias.*requires_grad=False"):
        select_parameters(model, ["head.weight", "head.bias"])
    with pytest.raises(ValueError, match="requires_grad=False"):
        fisher_diagonal(model, make_data(), params="head.bias")
    assert EWCRegularizer(model, params="head.bias").params == ("head.bias",)


def test_empty_or_malformed_selections() -> None:
    model = Net()
    with pytest.raises(ValueError, match="selected no parameters"):
        select_parameters(model, lambda name, p: False)
    with pytest.raises(ValueError, match="selected no parameters"):
        select_parameters(model, [])
    with pytest.raises(TypeError, match="params must be"):
        select_parameters(model, 3)
    with pytest.raises(TypeError, match="strings"):
        select_parameters(model, [model.head.weight])
    assert list(select_parameters(model, "head.bias")) == ["head.bias"]
    assert select_parameters(model, lambda name, p: name == "head.bias").keys() == {"head.bias"}
    model.head.bias.requires_grad_(False)  # (all it selects frozen: still an error here)
    with pytest.raises(ValueError, match="selected no parameters"):
        select_parameters(model, lambda name, p: name == "head.bias")


def test_parameters_instead_of_names_get_a_short_error_with_the_idiom() -> None:
    """``params=model.head.parameters()``: the error names the type and shape and shows what
    to pass (before: the whole weight tensor, over 1,000 characters)."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 3))
    with pytest.raises(TypeError) as error:
        EWCRegularizer(model, params=model[2].parameters())
    message = str(error.value)
    assert len(message) < 300, message
    assert "got a Parameter of shape (3, 32)" in message
    assert "[n for n, p in model.named_parameters() if ...]" in message
    assert "predicate (name, param) -> bool" in message


def test_regularizer_protects_only_the_selection() -> None:
    model, data = Net().double(), make_data()
    names = (n for n in ["head.weight", "head.bias"])  # an iterator: must survive two tasks
    reg = EWCRegularizer(model, strength=10.0, params=names)
    reg.consolidate(data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    reg.consolidate(data)
    assert set(reg.fisher) == {"head.weight", "head.bias"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    penalty = reg.penalty()
    grads = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    assert named["backbone.0.weight"] is None and named["head.weight"] is not None
    expected = sum(
        (reg.fisher[n] * (p - reg.anchor[n]).pow(2)).sum()
        for n, p in model.named_parameters() if n.startswith("head.")
    )
    torch.testing.assert_close(penalty, 5.0 * expected)
    restored = EWCRegularizer(model, params=["head.weight", "head.bias"])
    restored.load_state_dict(reg.state_dict())
    torch.testing.assert_close(restored.penalty(), penalty)


def test_a_tied_weight_selected_by_its_second_name_says_which_name_it_has():
    """``named_parameters()`` gives a shared tensor once, under its first name: the error said
    only that the second was no parameter of the model."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"'1.weight' is the tensor '0.weight'.*select it as"):
        fisher_diagonal(model, [torch.randint(0, 5, (4,))], params=["1.weight"])
    with pytest.raises(ValueError, match=r"'1.weight' is the tensor '0.weight'"):
        EWCRegularizer(model, params=["1.weight"])


class LaterHead(nn.Module):
    """A body, this task's head and a lazy head for a later task (``nn.LazyLinear``: no shape
    until a forward pass reaches it), chosen by ``task``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head1 = nn.Linear(6, 3)
        self.head2 = nn.LazyLinear(3)
        self.task = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head1 if self.task == 1 else self.head2)(self.body(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lazy_module_no_forward_has_reached_is_left_out(backend: str) -> None:
    """An uninitialized parameter (a later task's lazy head) has no values to protect: it is
    left out, and the others get their Fisher. Before, every engine raised PyTorch's
    "uninitialized parameter" error while restoring the model, which also lost the
    parameters' gradient hooks that were set aside for the call."""
    torch.manual_seed(0)
    model = LaterHead().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    model.head1.weight.register_hook(lambda g: g)
    got = fisher_diagonal(model, [(x, y)], "exact", backend=backend)
    plain = nn.Sequential(model.body, model.head1)
    want = dict(zip(got, brute_force_fisher(plain, x, None, "exact").values()))
    assert list(got) == ["body.0.weight", "body.0.bias", "head1.weight", "head1.bias"]
    assert_close_dicts(got, want, rtol=1e-10)
    assert len(model.head1.weight._backward_hooks) == 1
    assert nn.parameter.is_lazy(model.head2.weight)


def test_lazy_parameters_named_or_alone_are_errors_that_say_why() -> None:
    model = LaterHead().double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))]
    with pytest.raises(ValueError, match=r"\['head2.weight'\] are uninitialized.*LazyLinear"):
        fisher_diagonal(model, data, params=["head1.weight", "head2.weight"])
    with pytest.raises(ValueError, match=r"uninitialized ones .*: run it on a batch first"):
        fisher_diagonal(nn.Sequential(nn.LazyLinear(3)), data)


def test_a_lazy_head_joins_the_regularizer_after_its_first_forward_pass() -> None:
    torch.manual_seed(0)
    model = LaterHead().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    reg = EWCRegularizer(model, strength=1.0)
    assert "head2.weight" not in reg.consolidate([(x, y)])
    model.task = 2
    model(x)  # (training on task 2 reaches the head)
    fisher = reg.consolidate([(x, y)])
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(reg.fisher["head2.weight"], fisher["head2.weight"])
    assert reg.penalty().item() == 0.0
