"""Bad input: a clear error that says what was wrong and what is accepted; nothing lost."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.fisher import _check_finite

from .models import mlp
from .reference import assert_close_dicts, brute_force_fisher

X = torch.randn(4, 6, dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 3])
DATA = [(X, Y)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "fisher"}, r"unknown method 'fisher'; choose one of \['exact', 'sample'"),
        (
            {"likelihood": "poisson"},
            r"unknown likelihood 'poisson'; choose one of \['categorical', 'gaussian'",
        ),
        ({"backend": "jax"}, r"unknown backend 'jax'; choose one of \['auto'"),
        ({"n_samples": 0}, r"n_samples must be an integer >= 1 or None, got 0"),
        ({"mc_samples": 0}, r"mc_samples must be an integer >= 1, got 0"),
        ({"mc_samples": 1.5}, r"mc_samples must be an integer >= 1, got 1.5"),
        ({"chunk_size": -2}, r"chunk_size must be an integer >= 1 or None"),
    ],
)
def test_fisher_diagonal_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fisher_diagonal(mlp(), DATA, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": -1.0}, r"strength must be a number >= 0.0, got -1.0"),
        ({"strength": float("nan")}, r"strength must be a number"),
        ({"strength": 10**400}, r"strength must be a number >= 0.0, got 1000"),  # (overflows)
        ({"gamma": 1.5}, r"gamma must be a number in \[0.0, 1.0\], got 1.5"),
        ({"gamma": -0.1}, r"gamma must be a number in \[0.0, 1.0\]"),
        ({"mode": "offline"}, r"unknown mode 'offline'; choose one of \['online', 'separate'\]"),
        ({"method": "diag"}, r"unknown method 'diag'; choose one of"),
        ({"likelihood": "softmax"}, r"unknown likelihood 'softmax'"),
        ({"n_samples": 0}, r"n_samples must be an integer >= 1 or None"),
        ({"mc_samples": -3}, r"mc_samples must be an integer >= 1"),
    ],
)
def test_regularizer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWCRegularizer(mlp(), **kwargs)
    reg = EWCRegularizer(mlp(), strength=3.0)
    (name, value), = kwargs.items()
    before = getattr(reg, name)
    with pytest.raises(ValueError, match=match):  # set later, between tasks: checked too
        setattr(reg, name, value)
    assert getattr(reg, name) == before
    reg.strength = 7  # a good one is taken, as a float
    assert reg.strength == 7.0 and isinstance(reg.strength, float)


def test_settings_take_one_element_tensors_and_arrays():
    """``strength=torch.tensor(1e5)`` (a 0-d array too) is a number, kept as a Python float
    (before: "must be a number, got tensor(100000.)"); more elements are a clear error."""
    np = pytest.importorskip("numpy")
    reg = EWCRegularizer(mlp(), strength=torch.tensor(1e5), gamma=torch.tensor([0.5]))
    assert (reg.strength, reg.gamma) == (1e5, 0.5) and type(reg.strength) is float
    reg.strength = np.array(2e5)
    assert reg.strength == 2e5 and type(reg.strength) is float
    with pytest.raises(ValueError, match=r"strength must be a number >= 0.0 .*tensor of shape"):
        reg.strength = torch.ones(3)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0.0, 1.0\], got 2.0"):
        reg.gamma = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"strength must be a number >= 0.0, got True"):
        reg.strength = torch.tensor(True)
    assert (reg.strength, reg.gamma) == (2e5, 0.5)


def test_misspelt_settings_and_run_settings_are_refused_when_set():
    """A new attribute named like a setting (``reg.n_sample = 10``) set nothing the
    regularizer reads; ``distributed`` and ``process_group`` went unchecked until the next
    ``consolidate``; ``num_tasks`` could be set to -5, which made the regularizer's own state
    unloadable. Other new attributes stay the caller's."""
    reg = EWCRegularizer(mlp(), strength=3.0)
    misspelt = [("n_sample", "n_samples"), ("strehgth", "strength"), ("likelyhood", "likelihood")]
    for name, meant in misspelt:
        with pytest.raises(AttributeError, match=rf"no setting '{name}'; did you mean '{meant}'"):
            setattr(reg, name, 10)
        assert not hasattr(reg, name)
    with pytest.raises(ValueError, match=r"distributed must be True or False, got 'no'"):
        reg.distributed = "no"
    with pytest.raises(TypeError, match=r"process_group must be a torch.distributed Process"):
        reg.process_group = object()
    with pytest.raises(AttributeError, match="num_tasks"):
        reg.num_tasks = -5
    assert (reg.distributed, reg.process_group, reg.num_tasks) == (True, None, 0)
    reg.task_names = ["a"]  # (not like a setting: the caller's own)
    reg.strengths, reg.models = [1.0, 2.0], []  # (a setting's name with more: the caller's)
    reg.distributed = False
    EWCRegularizer(mlp()).load_state_dict(reg.state_dict())


def test_a_subclass_keeps_its_own_attributes_and_properties():
    """A subclass's schedule named after a setting (``strengths``) is its own, and assigning
    to its property runs the setter only (the check ran the getter, which raised here)."""

    class Scheduled(EWCRegularizer):
        def __init__(self, model, strengths):
            self.strengths = list(strengths)  # (before the regularizer's own attributes)
            self._schedule: list[float] = []
            super().__init__(model, strength=strengths[0])

        @property
        def schedule(self) -> float:
            return self._schedule[-1]  # (IndexError while empty)

        @schedule.setter
        def schedule(self, values: list[float]) -> None:
            self._schedule = list(values)

    reg = Scheduled(mlp(), [1.0, 5.0])
    reg.schedule = [3.0]
    assert (reg.strengths, reg.schedule, reg.strength) == ([1.0, 5.0], 3.0, 1.0)


def test_a_regularizer_pickled_with_num_tasks_as_an_attribute_loads():
    """Pickled before ``num_tasks`` became a read-only property (its ``__dict__`` held
    ``num_tasks``): it loads, counts its tasks and goes on (num_tasks, state_dict and
    consolidate raised AttributeError on '_num_tasks')."""
    import pickle

    reg = EWCRegularizer(mlp(), strength=3.0)
    reg.consolidate(DATA)
    old = pickle.loads(pickle.dumps(reg))
    vars(old)["num_tasks"] = vars(old).pop("_num_tasks")  # (as the old code kept it)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.num_tasks == 1 and "num_tasks" not in vars(loaded)
    assert torch.equal(loaded.penalty(), reg.penalty())
    loaded.consolidate(DATA)
    assert loaded.num_tasks == 2


def test_consolidate_names_itself_for_unknown_keyword_arguments():
    """A misspelt keyword argument of ``consolidate`` raised fisher_diagonal's TypeError
    ("fisher_diagonal() got an unexpected keyword argument"), ``model=`` "multiple values"."""
    reg = EWCRegularizer(mlp(), strength=3.0)
    with pytest.raises(TypeError, match=r"consolidate\(\) got an unexpected keyword argument "
                       r"'chunk_sise'; did you mean 'chunk_size'\?"):
        reg.consolidate(DATA, chunk_sise=2)
    with pytest.raises(TypeError, match=r"consolidate\(\) got an unexpected keyword argument "
                       r"'model' \(it takes \['output_fn', 'generator', 'progress', "):
        reg.consolidate(DATA, model=mlp())
    with pytest.raises(TypeError, match=r"'n_sample'; did you mean the setting 'n_samples' "
                       r"\(reg.n_samples = ...\)\?"):
        reg.consolidate(DATA, n_sample=3)
    assert reg.num_tasks == 0
    reg.consolidate(DATA, chunk_size=2, backend="loop", memory_budget=2**20,
                    max_exact_vectors=16)
    assert reg.num_tasks == 1


def test_regularizer_and_fisher_need_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got list"):
        EWCRegularizer([torch.zeros(2)])
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got function"):
        fisher_diagonal(lambda x: x, DATA)


@pytest.mark.parametrize(
    ("backend", "method"),
    [("auto", "exact"), ("hooks", "empirical"), ("loop", "exact"), ("auto", "batched")],
)
def test_an_output_without_gradient_says_so(backend, method):
    """An ``output_fn`` that detaches the output (or a model that computes it without
    gradients) leaves nothing to pull back: a ValueError that says so, where autograd's own
    "element 0 of tensors does not require grad" came before. (The functorch engine's
    pull-backs of such an output are zeros, and its Fisher is.)"""
    model = mlp()
    with pytest.raises(ValueError, match=r"output \(after output_fn\) does not depend on any"):
        fisher_diagonal(model, DATA, method, backend=backend, output_fn=lambda o: o.detach())


def test_complex_parameters_are_refused_with_a_remedy():
    """Complex parameters: a clear error that says how to make them real pairs (the engines
    squared complex gradients, and the check of the sums failed with "value cannot be
    converted to type double without overflow")."""

    class Complex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5, dtype=torch.complex128))

        def forward(self, x):
            return (x.to(torch.complex128) @ self.w).abs()

    with pytest.raises(ValueError, match=r"parameters \['w'\] are complex.*view_as_real"):
        fisher_diagonal(Complex(), DATA)
    with pytest.raises(ValueError, match=r"are complex"):
        EWCRegularizer(Complex()).consolidate(DATA)


def test_empty_data():
    with pytest.raises(ValueError, match="no samples"):
        fisher_diagonal(mlp(), [])
    with pytest.raises(ValueError, match="no samples"):
        fisher_diagonal(mlp(), [(X[:0], Y[:0])], "batched")


@pytest.mark.parametrize(
    "data",
    [X, {"inputs": X, "labels": Y}, 3, [()], [(5,)], [{"mask": None}], [(X, 5)], ["abc"]],
)
def test_data_of_unaccepted_form_is_a_type_error(data):
    with pytest.raises(TypeError, match="accepted batch forms"):
        fisher_diagonal(mlp(), data)


@pytest.mark.parametrize("method", ["empirical", "batched"])
@pytest.mark.parametrize(
    "data", [[X], [(X,)], [(X[:2],), (X[2:], Y[2:])], [{"input": X, "labels": None}]]
)
def test_estimators_needing_labels_say_so_for_batches_of_inputs_only(method, data):
    with pytest.raises(ValueError, match=rf"method='{method}' needs the data's labels"):
        fisher_diagonal(mlp(), data, method)


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_labels_none_is_a_batch_of_inputs_only(method):
    """``{"labels": None}`` (a Hugging Face collator's batch without labels) is inputs only,
    as a dict without the key (before: a ``TypeError`` even for ``exact``)."""
    model = mlp()
    got = fisher_diagonal(
        model, [{"input": X, "labels": None}], method, generator=torch.Generator().manual_seed(0)
    )
    want = fisher_diagonal(
        model, [{"input": X}], method, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for tuple_batch in ((X, None), (X, None, torch.arange(4))):  # (it was a TypeError)
        got = fisher_diagonal(
            model, [tuple_batch], method, generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_labels_without_rows_beside_inputs_with_rows_are_an_error():
    """A batch whose labels have 0 rows but whose inputs have some was skipped as empty: its
    samples were left out of the Fisher without an error. An empty batch is still skipped."""
    model = mlp()
    with pytest.raises(ValueError, match=r"labels have 0 rows but no input tensor has 0 rows"):
        fisher_diagonal(model, [(X, Y), (X, Y[:0])])
    got = fisher_diagonal(model, [(X, Y), (X[:0], Y[:0])], "empirical")
    want = fisher_diagonal(model, [(X, Y)], "empirical")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_spent_iterator_says_so():
    """An iterator read to its end (by the training loop) gives no samples: the error says
    that an iterator is read once, which a list or a DataLoader is not."""
    batches = iter([(X, Y)])
    list(batches)
    with pytest.raises(ValueError, match=r"no samples \(data is an iterator: one read"):
        EWCRegularizer(mlp()).consolidate(batches)
    with pytest.raises(ValueError, match=r"^data yielded no samples; pass"):
        fisher_diagonal(mlp(), [])


@pytest.mark.parametrize("method", ["empirical", "batched"])
def test_label_outside_classes_names_label_and_c(method):
    with pytest.raises(ValueError, match=r"target label 7 is outside the C=3 classes"):
        fisher_diagonal(mlp(), [(X, torch.tensor([0, 7, 1, 2]))], method,
                        output_fn=lambda o: o[:, :3])
    with pytest.raises(ValueError, match=r"target label -1 is outside the C=5 classes"):
        fisher_diagonal(mlp(), [(X, torch.tensor([0, -1, 1, 2]))], method)


def test_float_labels_for_categorical():
    with pytest.raises(ValueError, match="integer class indices"):
        fisher_diagonal(mlp(), [(X, Y.double())], "empirical")


@pytest.mark.parametrize(
    "output_fn",
    [lambda o: o[0], lambda o: o[:2], lambda o: o.sum(1), lambda o: o[:, :0]],
)
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_output_fn_of_wrong_shape(output_fn, method):
    with pytest.raises(ValueError, match=r"must have shape \(B, C\) = \(4, C\)"):
        fisher_diagonal(mlp(), DATA, method, output_fn=output_fn)


class LogitsAndAuxLoss(nn.Module):
    """``(logits, aux_loss)``, the loss a batch mean, as mixture-of-experts layers return."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits, logits.pow(2).mean()


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
def test_output_that_is_not_a_tensor(backend):
    """Before, the functorch engine failed with "'tuple' object has no attribute 'detach'", and
    ``auto`` warned that the samples are mixed (the batch-mean loss beside the logits) first."""
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        fisher_diagonal(mlp(), DATA, output_fn=lambda o: (o,), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"must be a tensor of shape.*pass output_fn"):
            fisher_diagonal(LogitsAndAuxLoss(), DATA, backend=backend)
    with pytest.raises(TypeError, match="output_fn must be callable"):
        fisher_diagonal(mlp(), DATA, output_fn="logits", backend=backend)


def test_numpy_integers_as_counts():
    """Before, a NumPy ``chunk_size`` or ``memory_budget`` reached torch as a NumPy bool (the
    hooks engine's ``set_grad_enabled``: a TypeError)."""
    np = pytest.importorskip("numpy")
    model = mlp()
    want = fisher_diagonal(model, DATA, chunk_size=2, memory_budget=1 << 20)
    got = fisher_diagonal(model, DATA, chunk_size=np.int64(2), memory_budget=np.int64(1 << 20))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_bad_generator():
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        fisher_diagonal(mlp(), DATA, "sample", generator=0)


@pytest.mark.parametrize("method", ["exact", "sample", "empirical", "batched"])
def test_non_finite_fisher_is_floating_point_error(method):
    x = X.clone()
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        fisher_diagonal(mlp(), [(x, Y)], method)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finite_check_names_the_parameter_and_allows_sums_that_overflow(bad, engine_ways):
    """One sum checks all parameters (a fused one on a GPU); a sum that overflows float32 is
    not an error (each value is finite), and the error names the parameter at fault."""
    huge = torch.full((4,), 3e38)  # finite, its sum is inf in float32
    _check_finite({"a": huge, "b": torch.ones(3, dtype=torch.float64)}, torch.device("cpu"))
    b = torch.ones(3, dtype=torch.float64)
    b[1] = bad
    with pytest.raises(FloatingPointError, match="parameter 'b' contains NaN or Inf"):
        _check_finite({"a": huge, "b": b}, torch.device("cpu"))


def test_model_without_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        fisher_diagonal(model, DATA)


def test_gaussian_and_bernoulli_target_checks():
    with pytest.raises(ValueError, match="gaussian targets must have the output's shape"):
        fisher_diagonal(mlp(), [(X, torch.zeros(4, 2))], "empirical", likelihood="gaussian")
    with pytest.raises(ValueError, match=r"bernoulli targets must lie in \[0, 1\]"):
        fisher_diagonal(mlp(), [(X, torch.full((4, 5), 2.0))], "empirical",
                        likelihood="bernoulli")


def test_errors_restore_the_model():
    model = mlp()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError):
        fisher_diagonal(model, [(X, torch.tensor([0, 9, 1, 2]))], "batched")
    assert model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    broken = nn.Sequential(nn.Linear(6, 3).double(), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        fisher_diagonal(broken, DATA)
    assert broken.training and broken[0].training


class RaggedBags(nn.Module):
    """``nn.EmbeddingBag`` on flat indices with offsets: the samples cannot be cut from the
    batch along a first dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="mean")
        self.head = nn.Linear(4, 3)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(text, offsets))


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
def test_inputs_that_cannot_be_cut_into_samples_say_so(backend):
    """The model's own error surfaces, with a note (Python 3.11+) on how samples were cut; the
    hooks engine finds the first two samples' outputs change when they are cut and says so."""
    model = RaggedBags().double()
    text, offsets = torch.randint(0, 20, (14,)), torch.tensor([0, 3, 8, 10])
    data = [{"text": text, "offsets": offsets, "labels": torch.tensor([0, 1, 2, 0])}]
    if backend == "hooks":
        with pytest.raises(ValueError, match=r"differs when they are run alone.*text \(14,\)"):
            fisher_diagonal(model, data, backend=backend)
        return
    with pytest.raises(RuntimeError, match=r"offsets\[0\] has to be 0") as info:
        fisher_diagonal(model, data, backend=backend)
    if sys.version_info >= (3, 11):
        (note,) = info.value.__notes__
        assert "failed on sample 1 alone" in note and "(first dimension 4)" in note
        assert "(14,)" in note and "pad them to (B, L)" in note


class SharedBank(nn.Module):
    """Reads row 0 of a ``(K, D)`` bank all samples share, next to ``(B, D)`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(x + bank[0]))


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_a_shared_bank_read_from_its_first_row_is_not_cut_silently(backend):
    """A shared bank with ``K == B`` rows of which the model reads row 0: cut into samples,
    sample ``n`` reads row ``n``. The check compared only cuts starting at sample 0, which
    all see row 0, and the Fisher was 49% off (relative) without an error; it now also runs
    samples 1 on, and says so."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    bank = 3 * torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cutting the batch into samples changes the model"):
        fisher_diagonal(SharedBank().double(), [{"x": x, "bank": bank, "labels": y}],
                        backend=backend)


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_per_sample_tensors_the_batch_cannot_reach_say_so(backend):
    """Per-sample tensors inside a dataclass are not cut (``pytree`` does not enter it): each
    "sample" runs the whole batch. A ValueError with the batch's layout and the remedy
    (before: autograd's bare "Mismatch in shape")."""
    from dataclasses import dataclass

    @dataclass
    class Inputs:
        x: torch.Tensor

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(6, 5)

        def forward(self, inputs: Inputs) -> torch.Tensor:
            return self.layer(inputs.x)

    model = Reads().double()
    with pytest.raises(ValueError, match=r"output on sample 0 alone has shape \(4, 5\).*dataclass"):
        fisher_diagonal(model, [(Inputs(X), Y)], backend=backend)


def test_mappings_that_are_not_dicts_are_dict_batches():
    """Hugging Face's ``BatchEncoding`` (a tokenizer's or a collator's output) is a
    ``UserDict``, not a ``dict``: taken as a dict batch (it was a TypeError)."""
    from collections import UserDict

    model = mlp()

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.inner(features)

    keyword = Keyword()
    as_dict = fisher_diagonal(keyword, [{"features": X, "labels": Y}], "empirical")
    as_mapping = fisher_diagonal(keyword, [UserDict(features=X, labels=Y)], "empirical")
    assert all(torch.equal(as_dict[n], as_mapping[n]) for n in as_dict)


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_a_mapping_inside_a_batch_is_cut_and_moved_as_a_dict(backend):
    """``(tokenizer(texts), labels)`` puts a ``BatchEncoding`` (a ``UserDict``) inside the
    batch, which ``pytree`` takes for a leaf: before, its tensors were neither cut into samples
    (``n_samples`` failed on the output's shape; the functorch and loop engines failed) nor
    moved to the model's device. It reaches the model as a dict, like a dict inside."""
    from collections import UserDict

    from ewc_reg._batches import as_batch

    model = mlp()

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs: dict) -> torch.Tensor:
            return self.inner(inputs["features"])

    reads = Reads()
    for n_samples in (None, 3):
        want = brute_force_fisher(model, X[:n_samples], Y[:n_samples], "empirical")
        got = fisher_diagonal(
            reads, [(UserDict(features=X), Y)], "empirical", backend=backend, n_samples=n_samples
        )
        assert_close_dicts({f"inner.{n}": f for n, f in want.items()}, got, rtol=1e-10)
    moved = as_batch(([UserDict(features=X)], Y)).to(torch.device("meta"))
    assert moved.args[0][0]["features"].is_meta


class SharedMixing(nn.Module):
    """Takes a ``(T, T)`` mixing matrix all samples share, next to ``(B, T, 3)`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(mix @ self.inner(x)).mean(-2))


@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
def test_a_shared_input_as_long_as_the_batch_is_not_cut_silently(backend):
    """A shared ``(T, T)`` input with ``T == B`` would be cut into samples as if per-sample:
    an error saying so (before: a wrong Fisher from the functorch and loop engines). With a
    leading dimension of 1 it is passed whole, and the Fisher is right."""
    torch.manual_seed(0)
    model = SharedMixing().double()
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    mix = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cutting the batch into samples changes the model"):
        fisher_diagonal(model, [{"x": x, "mix": mix, "labels": y}], "empirical", backend=backend)
    data = [{"x": x, "mix": mix[None], "labels": y}]
    got = fisher_diagonal(model, data, "empirical", backend=backend)
    names, params = zip(*model.named_parameters())
    want = {name: torch.zeros_like(p) for name, p in zip(names, params)}
    for n in range(4):
        loss = torch.nn.functional.cross_entropy(model(x[n : n + 1], mix), y[n : n + 1])
        for name, g in zip(names, torch.autograd.grad(loss, params)):
            want[name] += g.square() / 4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)


def test_a_model_that_fails_on_its_whole_batch_raises_its_own_error():
    """The check of the cut (two per-sample inputs) ran the model on a few samples first and
    blamed the cut for any error: a model that fails on every input (Mixtral's grouped
    matmul in float64) got a message about cutting the batch."""

    class Refusing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError("grouped_mm does not take float64")

    data = [{"x": torch.randn(4, 3), "scale": torch.rand(4, 1), "labels": torch.zeros(4).long()}]
    with pytest.raises(NotImplementedError, match="grouped_mm does not take float64"):
        fisher_diagonal(Refusing(), data)


def test_one_batch_passed_without_a_list_says_so():
    """``fisher_diagonal(model, (x, y))`` would take ``x`` and ``y`` for two batches of
    inputs (feeding the labels to the model)."""
    with pytest.raises(TypeError, match=r"tuple of 2 tensors, which looks like one batch"):
        fisher_diagonal(mlp(), (X, Y))


def test_one_batch_passed_as_a_list_says_so():
    """``[x, y]``, two tensors of one first dimension, may be one batch or two batches of
    inputs: classification (before: the model's own dtype error), regression (float targets)
    and a language model's ids and labels (same shape and dtype; before: the labels fed to
    the model, a Fisher 14-37% off without an error) all say so; two batches of inputs are
    written ``[(x1,), (x2,)]``, or differ in size."""
    model = mlp()
    with pytest.raises(
        ValueError,
        match=r"list of 2 tensors of shapes \(4, 6\), \(4,\), which looks like one batch; "
        r"pass .*\[\(inputs, targets.*\[\(x1,\), \(x2,\), \.\.\.\]",
    ):
        fisher_diagonal(model, [X, Y])
    ids = torch.randint(0, 5, (4, 6))
    with pytest.raises(ValueError, match="looks like one batch"):
        fisher_diagonal(nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 5)), [ids, ids])
    # (inputs, targets, task ids) as a list: before, the model's dtype error; a language
    # model's ids, labels and mask: labels and mask fed to the model, 0.94 off, no error
    with pytest.raises(ValueError, match=r"list of 3 tensors of shapes \(4, 6\), \(4,\), \(4,\)"):
        fisher_diagonal(model, [X, Y, torch.zeros(4).long()])
    with pytest.raises(ValueError, match="list of 3 tensors"):
        fisher_diagonal(nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 5)), [ids] * 3)
    with pytest.raises(ValueError, match="looks like one batch"):
        EWCRegularizer(model).consolidate([X, Y])
    regression = torch.randn(4, 5)
    with pytest.raises(ValueError, match="looks like one batch"):
        fisher_diagonal(model, [X, regression], likelihood="gaussian")

    names = {n for n, _ in model.named_parameters()}
    assert set(fisher_diagonal(model, [(X[:2],), (X[2:],)])) == names
    assert set(fisher_diagonal(model, [X[:3], X[3:]])) == names
    assert set(fisher_diagonal(model, [X, X, X[:3]])) == names


class MaskedLogits(nn.Module):
    """Logits masked with -inf where a per-sample mask (a second input) forbids a class."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.layer(x).masked_fill(~allowed, float("-inf"))


def test_logits_masked_with_infinities_pass_the_cut_check():
    """Equal infinities are equal outputs (before: -inf - -inf = NaN failed the check)."""
    torch.manual_seed(0)
    model = MaskedLogits().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    allowed = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    data = [{"x": x, "allowed": allowed, "labels": torch.tensor([0, 1, 2, 3])}]
    got = fisher_diagonal(model, data, "empirical")
    want = fisher_diagonal(model, data, "empirical", backend="loop")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_categorical_likelihood_over_one_class_is_warned_of(method):
    """One logit (a binary classifier trained with ``BCEWithLogitsLoss``) with the default
    likelihood: a Fisher of 0 everywhere, which was given without a word."""
    model = nn.Linear(6, 1).double()
    with pytest.warns(UserWarning, match='likelihood="bernoulli"'):
        fisher = fisher_diagonal(model, [(X, torch.zeros(4, dtype=torch.long))], method)
    assert all(not f.any() for f in fisher.values())


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_labels_of_another_length_than_the_inputs_are_named_in_the_error(method):
    """Six inputs, four labels: the error blamed the output's shape alone."""
    with pytest.raises(ValueError, match=r"\(4, C\)") as caught:
        fisher_diagonal(mlp(), [(torch.randn(6, 6, dtype=torch.float64), Y)], method)
    assert "no input tensor has the labels' 4 rows" in "".join(caught.value.__notes__)
