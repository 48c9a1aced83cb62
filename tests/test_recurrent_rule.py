"""The recurrent-layer rule of the hook engine: nn.LSTM, nn.GRU, nn.RNN (float64, against the
brute-force loop; torch.func cannot run them)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from ewc_reg import fisher_diagonal
from ewc_reg.engines import recurrent, rules
from ewc_reg.engines.recording import plan
from ewc_reg.likelihoods import Categorical

from .reference import assert_close_dicts, brute_force_batched, brute_force_fisher
from .test_hooks_engine import trainable


class Tagger(nn.Module):
    """A recurrent classifier over ``(B, T, 4)`` inputs reading the output sequence and, for
    one direction, the final states too."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, **options) -> None:
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True, **options)
        size = getattr(self.rnn, "proj_size", 0) or 5
        self.head = nn.Linear(size * (2 if self.rnn.bidirectional else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        out, state = self.rnn(x)
        logits = self.head(out.mean(1))
        if not self.rnn.bidirectional:
            h, c = state if isinstance(self.rnn, nn.LSTM) else (state, state)
            logits = logits + h[-1, :, :3] * c[0, :, :3].tanh()
        return logits


OPTIONS = {
    "one_layer": {},
    "two_layers": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "no_bias": {"bias": False},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "gru": {"cell": nn.GRU},
    "gru_two_layers_bidirectional": {"cell": nn.GRU, "num_layers": 2, "bidirectional": True},
    "rnn_tanh": {"cell": nn.RNN},
    "rnn_relu_two_layers": {"cell": nn.RNN, "nonlinearity": "relu", "num_layers": 2},
    "projection": {"proj_size": 3},
    "projection_two_layers": {"proj_size": 3, "num_layers": 2},
    "projection_two_layers_bidirectional": {"proj_size": 3, "num_layers": 2, "bidirectional": True},
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_recurrent_rule_matches_brute_force(
    name: str, method: str, caplog, engine_ways: str
) -> None:
    torch.manual_seed(0)
    model = Tagger(**OPTIONS[name]).double().eval()
    unit = next(u for u in plan(model, trainable(model)) if u.path == "rnn")
    assert unit.rule is recurrent.recurrent_layer
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(
            model, [(x, y)], method, mc_samples=2, generator=torch.Generator().manual_seed(7)
        )
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    with torch.no_grad():
        draws = Categorical().sample(model(x), 2, torch.Generator().manual_seed(7))
    assert_close_dicts(got, brute_force_fisher(model, x, y, method, sampled=draws), 1e-10)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN, "projected"])
def test_the_pieces_are_the_module(cell: type[nn.RNNBase] | str) -> None:
    """The recorded forward computes what the module does, and keeps its pieces."""
    torch.manual_seed(0)
    options = {"num_layers": 2, "bidirectional": True, "batch_first": True}
    if cell == "projected":
        cell, options = nn.LSTM, {**options, "proj_size": 3}
    module = cell(4, 5, **options).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    kept: dict[str, Tensor] = {}

    def keep(name: str, piece: Tensor, pull_back: bool) -> Tensor:
        kept[name] = piece
        return piece

    got = recurrent.recurrence_in_pieces(module, (x,), {}, keep)
    want = module(x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.allclose(g, w, atol=1e-12)
    suffixes = ("_l0", "_l0_reverse", "_l1", "_l1_reverse")
    projected = "proj_size" in options
    pieces = "axhr" if cell is nn.GRU else "axhmo" if projected else "axh"
    assert set(kept) == {f"{p}{s}" for p in pieces for s in suffixes}
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    layer_output = 6 if projected else 10
    assert kept["a_l1"].shape == (3, 6, 5 * gates) and kept["x_l1"].shape == (3, 6, layer_output)


class EncoderDecoder(nn.Module):
    """A decoder started from an encoder's final states (``module(x, hx)``), both two layers;
    the encoder sequence-first, the decoder batch-first."""

    def __init__(self, cell: type[nn.RNNBase], **options) -> None:
        super().__init__()
        self.encoder = cell(4, 5, num_layers=2, **options)
        self.decoder = cell(4, 5, num_layers=2, batch_first=True, **options)
        self.head = nn.Linear(options.get("proj_size", 5), 3)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.encoder(x[:, :3].transpose(0, 1))
        out, _ = self.decoder(x[:, 3:], state)
        return self.head(out.mean(1))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_initial_states_given(cell: type[nn.RNNBase], caplog) -> None:
    """States passed in ``(layers, B, H)`` (from another layer here, so they get gradients)."""
    torch.manual_seed(0)
    model = EncoderDecoder(cell).double().eval()
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class SequenceFirst(nn.Module):
    """Runs its recurrent layer on ``(T, B, D)`` (unless ``batch_first``)."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, **options) -> None:
        super().__init__()
        self.rnn = cell(4, 5, **options)
        self.head = nn.Linear(getattr(self.rnn, "proj_size", 0) or 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        batch_first = self.rnn.batch_first
        out = self.rnn(x if batch_first else x.transpose(0, 1))[0]
        return self.head(out[:, -1] if batch_first else out[-1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_sequence_first_layers(cell: type[nn.RNNBase], caplog) -> None:
    """``(T, B, D)`` in and out, ``batch_first=False`` (PyTorch's default): the rule takes the
    batch from the second dimension, even when the sequence is as long as the batch."""
    torch.manual_seed(0)
    model = SequenceFirst(cell=cell, num_layers=2).double().eval()
    assert plan(model, trainable(model))[0].rule is recurrent.recurrent_layer
    for steps in (6, 5):  # (5: as many steps as samples)
        x, y = torch.randn(5, steps, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            got = fisher_diagonal(model, [(x, y)])
        assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
        assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_projections_sequence_first_and_given_states(batch_first: bool, caplog) -> None:
    """An LSTM with ``proj_size`` keeps the rule, sequence-first too, and with initial states
    of the projected size passed in."""
    torch.manual_seed(0)
    model = SequenceFirst(batch_first=batch_first, proj_size=2, num_layers=2).double().eval()
    assert plan(model, trainable(model))[0].rule is recurrent.recurrent_layer
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    decoder = EncoderDecoder(nn.LSTM, proj_size=2).double().eval()
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(decoder, [(x, y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(got, brute_force_fisher(decoder, x, y, "exact"), 1e-10)


def test_unbatched_input_is_left_to_the_module() -> None:
    lstm = nn.LSTM(4, 5).double()
    assert recurrent.recurrence_in_pieces(lstm, (torch.randn(6, 4),), {}, None) is NotImplemented


class FirstLayerState(nn.Module):
    """Reads only the first layer's final state of a two-layer projected LSTM: only zeros reach
    the second layer (through the stacked final states)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, num_layers=2, batch_first=True, proj_size=3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[1][0][0])


def test_projection_layers_nothing_reaches() -> None:
    torch.manual_seed(0)
    model = FirstLayerState().double().eval()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = fisher_diagonal(model, [(x, y)], backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


# --- the cells: nn.LSTMCell, nn.GRUCell, nn.RNNCell -----------------------------------------


class OneStep(nn.Module):
    """One step of a cell, from no state or from a given one (as ``hx=``), reading ``h`` (and
    an LSTM's ``c``)."""

    def __init__(self, cell: type[nn.Module], given: bool, **options) -> None:
        super().__init__()
        self.cell, self.given = cell(4, 5, **options), given
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        hx = None
        if self.given:  # (a state that depends on the sample)
            h = torch.tanh(x[:, :1]).expand(-1, 5)
            hx = (h, h * 0.5) if isinstance(self.cell, nn.LSTMCell) else h
        state = self.cell(x, hx=hx)
        if isinstance(state, tuple):
            return self.head(state[0]) + state[1][:, :3]
        return self.head(state)


CELLS = {
    "lstm": (nn.LSTMCell, {}),
    "lstm_no_bias": (nn.LSTMCell, {"bias": False}),
    "gru": (nn.GRUCell, {}),
    "gru_no_bias": (nn.GRUCell, {"bias": False}),
    "rnn_tanh": (nn.RNNCell, {}),
    "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_cell_rule_matches_brute_force(name, given, method, caplog, engine_ways) -> None:
    torch.manual_seed(0)
    cell, options = CELLS[name]
    model = OneStep(cell, given, **options).double()
    unit = next(u for u in plan(model, trainable(model)) if u.path == "cell")
    assert unit.rule is recurrent.recurrent_cell
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


@pytest.mark.parametrize("name", list(CELLS))
def test_the_cell_pieces_are_the_module(name: str) -> None:
    cell, options = CELLS[name]
    module = cell(4, 5, **options).double()
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    hx = (h, h.flip(0)) if cell is nn.LSTMCell else h
    kept: dict[str, Tensor] = {}

    def keep(name: str, piece: Tensor, pull_back: bool) -> Tensor:
        kept[name] = piece
        return piece

    leaves = torch.utils._pytree.tree_leaves
    for state in (None, hx):
        got = recurrent.cell_in_pieces(module, (x, state), {}, keep)
        want = module(x, state)
        for g, w in zip(leaves(got), leaves(want)):
            assert torch.allclose(g, w, atol=1e-12)
    assert set(kept) == set("axhr" if cell is nn.GRUCell else "axh")
    assert kept["a"].shape == (3, 5 * recurrent._GATES[cell]) and kept["h"] is h
    assert recurrent.cell_in_pieces(module, (x[0],), {}, keep) is NotImplemented


# --- a recurrent layer called more than once per forward pass --------------------------------


class RunTwice(nn.Module):
    """One recurrent layer run on a sequence and on it reversed (``"siamese"``), or on its two
    halves, the second from the first's final states (``"chained"``)."""

    def __init__(self, how: str, cell: type[nn.RNNBase] = nn.LSTM, **options) -> None:
        super().__init__()
        self.how = how
        self.rnn = cell(4, 5, batch_first=True, **options)
        size = getattr(self.rnn, "proj_size", 0) or 5
        self.head = nn.Linear(size * (2 if self.rnn.bidirectional else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "siamese":
            first, _ = self.rnn(x)
            second, _ = self.rnn(x.flip(1))
        else:
            first, state = self.rnn(x[:, :2])
            second, _ = self.rnn(x[:, 2:], state)
        return self.head(first.mean(1) * second[:, -1])


RUN_TWICE = {
    "lstm_siamese": ("siamese", {}),
    "lstm_chained": ("chained", {}),
    "gru_two_layers_bidirectional_chained": (
        "chained",
        {"cell": nn.GRU, "num_layers": 2, "bidirectional": True},
    ),
    "rnn_siamese": ("siamese", {"cell": nn.RNN}),
}


@pytest.mark.parametrize("name", list(RUN_TWICE))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_layer_called_twice_is_joined(name, method, caplog, engine_ways) -> None:
    torch.manual_seed(0)
    how, options = RUN_TWICE[name]
    model = RunTwice(how, **options).double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


def test_a_projected_lstm_called_twice_goes_to_functorch(caplog) -> None:
    """Its projection's sums pair each step with the next: its calls cannot be joined."""
    model = RunTwice("chained", proj_size=3).double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert "called more than once" in messages[0] and "functorch" in messages[0]
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


# --- rows folded into the batch dimension -----------------------------------------------------


class RowsAndColumns(nn.Module):
    """Sequencer's 2-d recurrence: each sample is a ``(H, W, 4)`` grid, one recurrent layer
    runs along its rows (``(B H, W, 4)``, the rows folded into the batch dimension) and one
    along its columns (``(B W, H, 4)``), or a cell steps along the rows by hand
    (``cell`` a cell class)."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM, given: bool = False, **options) -> None:
        super().__init__()
        self.given = given  # the rows' layer starts from states made of each row
        self.stepped = cell in (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
        if self.stepped:
            self.rows = cell(4, 5)
            width = 5
        else:
            options.setdefault("batch_first", True)
            self.rows = cell(4, 5, **options)
            self.columns = cell(4, 5, **options)
            size = getattr(self.rows, "proj_size", 0) or 5
            width = 2 * size * (2 if self.rows.bidirectional else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        if self.stepped:
            rows = x.reshape(b * h, w, c)
            state = None
            for t in range(w):
                state = self.rows(rows[:, t], state)
            out = state[0] if isinstance(state, tuple) else state
            return self.head(out.reshape(b, h, -1).mean(1))
        states = ()
        if self.given:  # (layers, B H, 5) from each row's mean
            state = x.reshape(b * h, w, c).mean(1).repeat(self.rows.num_layers, 1, 2)[..., :5]
            states = ((state, state.tanh()) if isinstance(self.rows, nn.LSTM) else state,)
        rows, _ = self._run(self.rows, x.reshape(b * h, w, c), *states)
        columns, _ = self._run(self.columns, x.transpose(1, 2).reshape(b * w, h, c))
        joined = torch.cat(
            [rows.reshape(b, h, w, -1), columns.reshape(b, w, h, -1).transpose(1, 2)], -1
        )
        return self.head(joined.tanh().mean((1, 2)))

    @staticmethod
    def _run(layer: nn.RNNBase, x: Tensor, *states: object) -> tuple[Tensor, object]:
        """``layer`` on batch-first ``x``, transposed around it for a sequence-first layer."""
        if layer.batch_first:
            return layer(x, *states)
        out, state = layer(x.transpose(0, 1), *states)
        return out.transpose(0, 1), state


FOLDED = {
    "lstm": {},
    "lstm_two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "gru_bidirectional": {"cell": nn.GRU, "bidirectional": True},
    "rnn": {"cell": nn.RNN},
    "gru_sequence_first": {"cell": nn.GRU, "batch_first": False, "num_layers": 2},
    "lstm_given_states": {"given": True, "num_layers": 2},
    "rnn_sequence_first_given_states": {"cell": nn.RNN, "given": True, "batch_first": False},
    "lstm_cell": {"cell": nn.LSTMCell},
    "gru_cell": {"cell": nn.GRUCell},
}


@pytest.mark.parametrize("name", list(FOLDED))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_rows_folded_into_the_batch_dimension(name, method, caplog, engine_ways) -> None:
    """Each sample's rows are sequences of their own: its gradient sums over all of them."""
    torch.manual_seed(0)
    model = RowsAndColumns(**FOLDED[name]).double()
    x, y = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


def test_a_projected_lstm_on_folded_rows_is_not_split() -> None:
    """Its projection's sums pair each step with the next: rows cannot be joined as steps."""
    model = RowsAndColumns(proj_size=3).double()
    x, y = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="multiple of the batch"):
        fisher_diagonal(model, [(x, y)], backend="hooks")


def test_a_declined_call_on_folded_rows_is_flagged(monkeypatch, caplog) -> None:
    """A call its recorded forward declines would go to the per-module fallback with its
    inputs unfolded: the engine gives the model up instead (here, to the loop engine)."""
    monkeypatch.setitem(
        rules.RECORDED_FORWARDS, recurrent.recurrent_layer, lambda *args: NotImplemented
    )
    torch.manual_seed(0)
    model = RowsAndColumns().double()
    x, y = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="declined a call on rows folded"):
        fisher_diagonal(model, [(x, y)], backend="hooks")
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert any("declined a call on rows folded" in m for m in messages)
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


# --- eval mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_recurrent_layers_with_dropout_compute_their_eval_function(backend, method) -> None:
    """Inside the Fisher a recurrent layer runs in training mode with its dropout at 0 (cuDNN's
    backward refuses eval mode; test_cuda runs them on a GPU): what it computes is its eval
    function, and its mode and dropout are as before afterwards, also where the model fails."""
    torch.manual_seed(0)
    model = Tagger(num_layers=3, dropout=0.5, proj_size=3).double().eval()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    kwargs = {} if method == "batched" else {"backend": backend}
    got = fisher_diagonal(model, [(x, y)], method, **kwargs)
    want = (
        brute_force_batched(model, [(x, y)])
        if method == "batched"
        else brute_force_fisher(model, x, y, method)
    )
    assert_close_dicts(got, want, 1e-10)
    model.train()
    with pytest.raises(ValueError):  # (3 outputs, a label of 3)
        fisher_diagonal(model, [(x, torch.full((5,), 3))], "empirical", **kwargs)
    assert model.rnn.training and model.rnn.dropout == 0.5


class HookedGRU(nn.Module):
    """A GRU whose forward pre-hook reads its ``training`` flag: the old ``spectral_norm``
    (power iteration in training mode) or a weight drop (AWD-LSTM's DropConnect)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)
        if variant == "spectral_norm":
            nn.utils.spectral_norm(self.rnn, "weight_hh_l0")
        else:
            raw = self.rnn._parameters.pop("weight_hh_l0")
            self.rnn.register_parameter("weight_hh_l0_raw", raw)
            self.rnn.weight_hh_l0 = raw.detach().clone()

            def drop(module: nn.Module, args: tuple) -> None:
                raw = module.weight_hh_l0_raw  # (in eval, dropout returns it: not a copy)
                module.weight_hh_l0 = nn.functional.dropout(raw, 0.5, module.training) * 1.0

            self.rnn.register_forward_pre_hook(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("variant", ["spectral_norm", "weight_drop"])
@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
def test_a_recurrent_layer_whose_hooks_read_its_mode_stays_in_eval(variant, backend) -> None:
    """Before, such a layer ran in training mode like the others: the weight drop made the
    Fisher random (7-15% off), ``spectral_norm`` changed its buffers and the Fisher 50%."""
    torch.manual_seed(0)
    model = HookedGRU(variant).double().eval()
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    want = brute_force_fisher(model, x, y, "empirical")
    for _ in range(2):
        got = fisher_diagonal(model, [(x, y)], "empirical", backend=backend)
        assert_close_dicts(got, want, 1e-10)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert not model.rnn.training


class FrozenInput(nn.Module):
    """A recurrent layer (or a cell stepped by hand) whose input weights are frozen, with no
    trainable input bias, on data (no gradient): ``x W_ih + b_ih`` needs none."""

    def __init__(self, kind: str, bias: bool) -> None:
        super().__init__()
        self.kind = kind
        options = {} if "Cell" in kind else {"batch_first": True}
        self.rnn, self.head = getattr(nn, kind)(3, 4, bias=bias, **options), nn.Linear(4, 3)
        for name, p in self.rnn.named_parameters():
            if name.startswith(("weight_ih", "bias_ih")):
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if "Cell" not in self.kind:
            return self.head(self.rnn(x)[0][:, -1])
        state = None
        for t in range(x.shape[1]):
            state = self.rnn(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_input_weights_leave_the_others_their_fisher(kind, bias, monkeypatch) -> None:
    """The gates' input part was kept for the pull-back only where it needed a gradient: here
    it needs none, ``weight_hh`` got no gradient, and the check sent the model to the functorch
    engine (after an earlier call with every parameter trainable, its Fisher was 0 silently)."""
    from ewc_reg.engines import unit_sums

    monkeypatch.setattr(unit_sums, "_fallback_sums", None)  # (by the rule: would fail if called)
    torch.manual_seed(0)
    model = FrozenInput(kind, bias).double()
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    got = fisher_diagonal(model, [(x, y)], backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class _BidirectionalFinalStates(nn.Module):
    """A bidirectional LSTM with a projection whose final states ``h_n`` (the reverse
    direction's from its first position) feed the head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 6, proj_size=4, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, _) = self.lstm(x)
        return self.head(torch.cat([h[0], h[1]], -1))


def test_the_final_states_of_a_projected_reverse_direction() -> None:
    torch.manual_seed(0)
    model = _BidirectionalFinalStates().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
