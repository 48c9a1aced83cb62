"""Speed of the Fisher of a language model whose output layer is tied to its input embedding.

Run from the repository root::

    python -m benchmarks.lm_speed                  # writes benchmarks/results/lm_speed.md
    python -m benchmarks.lm_speed --quick          # tiny sizes, a smoke test (seconds)
    python -m benchmarks.lm_speed --vocab 5000 --batch-size 8 --seq-len 32 --repeats 5

Workloads (``--models``; inputs ``(B, T)`` token ids, next-token targets ``(B, T)``):

* ``toy``: :class:`benchmarks.models.TiedLanguageModel`, a 2-layer causal Transformer with
  nanoGPT's ``(T,)`` positions and its head tied to the token embedding;
* ``gpt2``, ``llama`` and ``opt``: Hugging Face's ``GPT2LMHeadModel``, ``LlamaForCausalLM``
  and ``OPTForCausalLM`` with ``tie_word_embeddings`` (2 layers, 64 hidden units, 4 heads;
  OPT runs its feed-forward blocks on hidden states folded to ``(B T, D)``, which the hooks
  engine takes unfolded), when ``transformers`` is installed (optional, never a dependency
  of ``ewc_reg``);
* ``bart``: Hugging Face's ``BartForConditionalGeneration`` (2 + 2 layers, 64 hidden units,
  4 heads; the decoder's inputs are the tokens shifted right, its table shared by the encoder,
  the decoder and the head; its position embeddings are shared by the samples, ``(1, T, D)``,
  which the hooks engine expands over the batch);
* ``gemma``: Hugging Face's ``GemmaForCausalLM`` (2 layers, 64 hidden units, 4 heads, 1
  key-value head), whose scaled token embedding is tied to the head;
* ``t5``: Hugging Face's ``T5ForConditionalGeneration`` (2 + 2 layers, 64 hidden units, 4
  heads) in :class:`TokensToT5`, its decoder's inputs the tokens shifted right; its relative
  position biases are looked up in tables with position buckets, outputs without the batch
  (shadowed per-sample copies: :mod:`ewc_reg.engines.shadows`), its layer norms are RMS norms.

Contenders, timed in one process round-robin, the order reversed every other round (medians):

* ``plain fwd+bwd``: the mean next-token cross-entropy and its backward (the unit);
* for ``empirical`` and ``sample`` (one label sequence drawn per sequence), on the tied model:
  * ``hooks, all rules``: the hooks engine with every rule, among them the one for the tied
    pair (:mod:`ewc_reg.engines.tied`);
  * ``hooks, tied pair on torch.func``: the same with that rule declining (patched), so the
    pair gets the per-module ``torch.func`` fallback, as before the rule existed;
  * ``hooks, RMS norms on torch.func`` (Llama and Gemma): the same with the rule for Hugging
    Face's RMS norms declining (:func:`ewc_reg.engines.rules.is_hugging_face_rms_norm`
    patched), so each norm gets the per-module fallback;
  * ``functorch engine``: the whole-model ``torch.func`` engine;
* and the hooks engine on an untied copy (the head given its own copy of the table): the two
  layers' own rules without the cross term, a floor for the tied rule.

Every Fisher of the tied model is compared with the functorch engine's (max relative
difference over the parameters). ``exact`` needs ``T·V`` vectors per sequence and is not timed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ewc_reg
from ewc_reg import fisher_diagonal
from ewc_reg.engines import rules, unit_sums

from ._reports import at_least, command_line, device_name, keeping_threads, machine, write_report
from ._timing import measure
from .models import TiedLanguageModel

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "lm_speed.md"
MODEL_KEYS = ("toy", "gpt2", "llama", "opt", "bart", "gemma", "t5")
METHODS = ("empirical", "sample")
#: The contenders on the tied model: (name, backend, the hooks engine's rules declined, from
#: :data:`DECLINABLE`).
CONTENDERS = (
    ("hooks, all rules", "hooks", ()),
    ("hooks, tied pair on torch.func", "hooks", ("tied",)),
    ("hooks, RMS norms on torch.func", "hooks", ("rms",)),  # (Llama, Gemma, T5)
    ("functorch engine", "functorch", ()),
)
#: The rules a contender may decline: the module attribute patched, and what it returns then.
DECLINABLE = {
    "tied": (unit_sums, "tied_sums", None),
    "rms": (rules, "is_hugging_face_rms_norm", False),
}
UNTIED = "hooks, untied copy"

Fisher = dict[str, Tensor]


@dataclass(eq=False)
class Workload:
    """A tied language model, its untied copy, and one batch."""

    key: str
    title: str
    model: nn.Module
    untied: nn.Module
    tokens: Tensor
    targets: Tensor


@dataclass
class Row:
    """The medians of one contender on one workload."""

    workload: str
    method: str
    name: str
    seconds: float
    peak_bytes: int | None
    agreement: float | None


def untied_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every parameter registered on more than one module is
    replaced, on all but the first, by a parameter of its own with the same values."""
    untied = copy.deepcopy(model)
    seen: set[int] = set()
    for module in untied.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in seen:
                setattr(module, name, nn.Parameter(p.detach().clone()))
            seen.add(id(p))
    return untied


class TokensToT5(nn.Module):
    """Hugging Face's T5 on tokens alone, as BART is: the decoder's inputs are the tokens
    shifted right (T5's ``_shift_right``); returns the logits ``(B, T, V)``."""

    def __init__(self, t5: nn.Module) -> None:
        super().__init__()
        self.t5 = t5

    def forward(self, tokens: Tensor) -> Tensor:
        decoder_inputs = self.t5._shift_right(tokens)
        return self.t5(input_ids=tokens, decoder_input_ids=decoder_inputs).logits


def _hugging_face(key: str, vocab: int, seq_len: int, quick: bool) -> nn.Module | None:
    """GPT-2, Llama, OPT, BART, Gemma or T5 with tied embeddings, or ``None`` without
    ``transformers``."""
    try:
        import transformers
    except ImportError:
        return None
    width = 16 if quick else 64
    if key == "t5":
        return TokensToT5(
            transformers.T5ForConditionalGeneration(
                transformers.T5Config(
                    vocab_size=vocab,
                    d_model=width,
                    d_kv=width // 4,
                    d_ff=2 * width,
                    num_layers=2,
                    num_decoder_layers=2,
                    num_heads=4,
                    decoder_start_token_id=0,
                    pad_token_id=0,
                )
            )
        )
    if key == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2, n_head=4, n_embd=width, vocab_size=vocab, n_positions=seq_len
            )
        )
    if key == "gemma":
        return transformers.GemmaForCausalLM(
            transformers.GemmaConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=width // 4,
                max_position_embeddings=seq_len,
            )
        )
    if key == "bart":
        return transformers.BartForConditionalGeneration(
            transformers.BartConfig(
                vocab_size=vocab,
                d_model=width,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=4 * width,
                decoder_ffn_dim=4 * width,
                max_position_embeddings=seq_len,
            )
        )
    if key == "opt":
        return transformers.OPTForCausalLM(
            transformers.OPTConfig(
                vocab_size=vocab,
                hidden_size=width,
                word_embed_proj_dim=width,
                ffn_dim=4 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=seq_len,
            )
        )
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=seq_len,
            tie_word_embeddings=True,
        )
    )


def make_workloads(args: argparse.Namespace, device: torch.device) -> list[Workload]:
    """The workloads of ``args.models`` (seeded, eval mode, on ``device``); those needing
    ``transformers`` are left out without it."""
    workloads = []
    for key in args.models:
        torch.manual_seed(0)
        if key == "toy":
            width = 16 if args.quick else 128
            model: nn.Module | None = TiedLanguageModel(args.vocab, args.seq_len, width)
            title = f"toy causal LM (D={width})"
        else:
            model = _hugging_face(key, args.vocab, args.seq_len, args.quick)
            names = {"gpt2": "GPT-2", "llama": "Llama", "opt": "OPT", "bart": "BART"}
            names |= {"gemma": "Gemma", "t5": "T5"}
            title = names[key] + " (transformers)"
        if model is None:
            continue
        tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1))
        model = model.to(device).eval()
        workloads.append(
            Workload(
                key,
                title,
                model,
                untied_copy(model),
                tokens[:, :-1].to(device),
                tokens[:, 1:].to(device),
            )
        )
    return workloads


def logits_of(output: Any) -> Tensor:
    """The logits: ``output`` itself or its ``.logits`` (Hugging Face)."""
    return output.logits if hasattr(output, "logits") else output


@contextmanager
def declining(names: Sequence[str]) -> Iterator[None]:
    """The hooks engine's rules of ``names`` (keys of :data:`DECLINABLE`) declining every
    call in the block."""
    with ExitStack() as stack:
        for name in names:
            owner, attribute, answer = DECLINABLE[name]
            stack.enter_context(
                mock.patch.object(owner, attribute, lambda *args, a=answer, **kwargs: a)
            )
        yield


def has_rms_norms(model: nn.Module) -> bool:
    """Whether ``model`` has a module with the rule for Hugging Face's RMS norms."""
    return any(rules.is_hugging_face_rms_norm(m) for m in model.modules())


def contenders(w: Workload, device: torch.device) -> dict[tuple[str, str], Callable[[], Any]]:
    """Each contender's call, by (method, name); the plain step under method ``""``."""

    def plain() -> None:
        logits = logits_of(w.model(w.tokens))
        F.cross_entropy(logits.flatten(0, 1), w.targets.flatten()).backward()
        w.model.zero_grad(set_to_none=True)

    def fisher(model: nn.Module, method: str, backend: str, declined: Sequence[str]) -> Fisher:
        generator = torch.Generator(device).manual_seed(0) if method == "sample" else None
        with declining(declined):
            return fisher_diagonal(
                model, [(w.tokens, w.targets)], method, backend=backend, generator=generator
            )

    rms = has_rms_norms(w.model)
    calls: dict[tuple[str, str], Callable[[], Any]] = {("", "plain fwd+bwd"): plain}
    for method in METHODS:
        for name, backend, declined in CONTENDERS:
            if "rms" in declined and not rms:
                continue
            calls[method, name] = lambda m=method, b=backend, d=declined: fisher(w.model, m, b, d)
        calls[method, UNTIED] = lambda m=method: fisher(w.untied, m, "hooks", ())
    return calls


def max_relative_difference(got: Fisher, reference: Fisher) -> float:
    """``max |got - reference| / max |reference|`` over the parameters."""
    return max(
        float((got[n] - reference[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30))
        for n in reference
    )


def benchmark(w: Workload, repeats: int, device: torch.device) -> list[Row]:
    """Medians over ``repeats`` rounds (after a warm-up round whose Fisher are compared)."""
    calls = contenders(w, device)
    first = {key: call() for key, call in calls.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    peaks: dict[tuple[str, str], list[int]] = {key: [] for key in calls}
    keys = list(calls)
    for i in range(max(repeats, 1)):
        for key in keys if i % 2 == 0 else keys[::-1]:
            done = measure(calls[key], device)
            times[key].append(done.seconds)
            if done.peak_bytes is not None:
                peaks[key].append(done.peak_bytes)
    rows = []
    for (method, name), seconds in times.items():
        agreement = None
        if method and name != UNTIED:
            agreement = max_relative_difference(
                first[method, name], first[method, "functorch engine"]
            )
        peak = int(statistics.median(peaks[method, name])) if peaks[method, name] else None
        rows.append(Row(w.title, method, name, statistics.median(seconds), peak, agreement))
    return rows


def render(rows: list[Row], args: argparse.Namespace, command: str, device: torch.device) -> str:
    """The markdown report: setup, then one table row per contender."""
    try:
        hf = f"transformers {metadata.version('transformers')}"
    except metadata.PackageNotFoundError:
        hf = "transformers not installed (its models left out)"
    lines = [
        "# Fisher of language models with tied embeddings",
        "",
        f"`{command}` · ewc_reg {ewc_reg.__version__} · torch {torch.__version__} · {hf} · "
        f"{machine(device)} ({os.cpu_count()} logical CPUs), {args.threads} threads · "
        f"{date.today()}",
        "",
        f"V={args.vocab}, B={args.batch_size}, T={args.seq_len}, float32; medians of "
        f"{max(args.repeats, 1)} rounds, round-robin, the order reversed every other round. "
        "Agreement: max relative difference from the functorch engine's Fisher.",
        "",
        "| model | method | contender | median ms | × fwd+bwd | peak MiB | agreement |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    unit = {row.workload: row.seconds for row in rows if not row.method}
    for row in rows:
        peak = "–" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:.0f}"
        agreement = "–" if row.agreement is None else f"{row.agreement:.1e}"
        lines.append(
            f"| {row.workload} | {row.method or '–'} | {row.name} | {row.seconds * 1e3:.1f} | "
            f"{row.seconds / unit[row.workload]:.1f} | {peak} | {agreement} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument(
        "--models",
        default=",".join(MODEL_KEYS),
        help=f"comma-separated subset of {','.join(MODEL_KEYS)} (default all)",
    )
    parser.add_argument("--vocab", type=at_least(1), default=5000, help="V (default 5000)")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="B (default 8)")
    parser.add_argument("--seq-len", type=at_least(1), default=32, help="T (default 32)")
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--threads", type=at_least(1), default=2, help="torch CPU threads (default 2)"
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (V=50, B=3, T=6, width 16), one round: a smoke test",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (default benchmarks/results/lm_speed.md; none with --quick)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - set(MODEL_KEYS):
        parser.error(f"--models takes a comma-separated subset of {','.join(MODEL_KEYS)}")
    if args.quick:
        args.vocab, args.batch_size, args.seq_len, args.repeats = 50, 3, 6, 1
    elif args.out is None:
        args.out = RESULTS_PATH
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark; print the report and write it where ``--out`` says."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    rows: list[Row] = []
    with keeping_threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch.func's performance warnings)
        torch.set_num_threads(args.threads)
        for w in make_workloads(args, device):
            print(f"{w.title}", file=sys.stderr, flush=True)
            rows += benchmark(w, args.repeats, device)
    markdown = render(rows, args, " ".join(["python -m benchmarks.lm_speed", *argv]), device)
    write_report(markdown, args.out)
    return rows


if __name__ == "__main__":
    main()
