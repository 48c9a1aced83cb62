"""Speed of the Fisher of timm models on the hooks engine, against a baseline (``--baseline``).

The baseline is the same engine without one of its features for such models: the rules for
timm's own layers (``--baseline no-timm-rules``, the default: the per-module ``torch.func``
fallback they replace), or parents as units of their own parameters (``--baseline
whole-parents``: a module whose parameters take no per-sample copies, as a timm ConvNeXt block's
layer scale before shadowed copies, is one unit of all the parameters inside it, as before), or
loose parameters without shadowed per-sample copies (``--baseline unshadowed``: a ConvNeXt
block's ``gamma.reshape(1, C, 1, 1)`` takes no other layout, and the block is a unit of its own
parameters on the per-module fallback, as before); or the whole-model functorch engine
(``--baseline functorch``: ViTs with parameters of their own on their attention modules, BEiT's,
EVA's and ConViT's, which went there before the hooks engine took per-sample copies of some
loose parameters only and made only the parents whose children's weights they use whole units);
or the loop engine (``--baseline loop``: Sequencer, whose LSTMs run on the rows and columns of
each image folded into the batch dimension, which ``torch.func`` cannot run, went there before
the recurrent rule took folded rows); or the pull-back looped over the vectors in every pass
(``--baseline looped``: on the CPU the engine loops for models with convolutions, batch norms or
attention only where the recorded outputs of each pass take ``hooks.looped_min_bytes()`` on
average, and batches the vectors in smaller passes: thin layers, small batches, or chunks of a
few samples, as models with many layers or large images get within the memory budget).

Run from the repository root (needs ``timm``, an optional import: ``pip install --no-deps timm``
beside the pinned torch)::

    python -m benchmarks.timm_speed               # writes benchmarks/results/timm_speed.md
    python -m benchmarks.timm_speed --baseline whole-parents   # results/timm_parents_speed.md
    python -m benchmarks.timm_speed --baseline unshadowed      # results/timm_shadows_speed.md
    python -m benchmarks.timm_speed --baseline functorch --batch-size 8  # ..._functorch_speed.md
    python -m benchmarks.timm_speed --baseline loop --batch-size 8 --repeats 3  # ..._loop_speed.md
    python -m benchmarks.timm_speed --baseline looped --batch-size 32 --repeats 3
    python -m benchmarks.timm_speed --models mobilenetv3_small_050 --batch-size 8 --repeats 3

For each model (``timm.create_model(name, num_classes=10)``, eval mode, float32, random
``(B, 3, S, S)`` images and labels) and each of ``exact`` and ``empirical``, the hooks engine
runs as it is and as the baseline, side by side in one process, the order reversed every other
round (medians; one call of each first, which pays the checks). The two Fisher diagonals are
compared (max relative difference over the parameters, of those whose largest entry is at
least 1e-12 of the largest of all: a bias before a softmax has a Fisher of 0 but for rounding,
which differs between the two)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import date
from functools import partial
from importlib import metadata
from pathlib import Path

import torch

from ewc_reg import fisher_diagonal
from ewc_reg.engines import hooks, loose, recording, rules

from ._coverage import require
from ._paths import pull_back
from ._reports import (
    at_least,
    command_line,
    keeping_threads,
    machine,
    report_file,
    write_report,
)
from ._timing import side_by_side

RESULTS = Path(__file__).parent / "results"
#: Models whose size of images is a setting (made for the benchmark's size).
SIZED = ("deit3", "vit", "cait", "eva", "levit", "beit", "convit", "swin")


def rule_names() -> list[str]:
    """The qualified names of timm's layers in :data:`ewc_reg.engines.rules.RULES`."""
    return [name for name in rules.RULES if isinstance(name, str) and name.startswith("timm.")]


@contextmanager
def without_timm_rules() -> Iterator[None]:
    """Inside the block, timm's layers have no rule (the per-module fallback)."""
    removed = {name: rules.RULES.pop(name) for name in rule_names()}
    try:
        yield
    finally:
        rules.RULES.update(removed)


def on_backend(backend: str) -> Callable[[], AbstractContextManager[dict[str, str]]]:
    """A block yielding the keywords that choose another engine, ``backend``."""

    @contextmanager
    def block() -> Iterator[dict[str, str]]:
        yield {"backend": backend}

    return block


#: The arrangements the hooks engine finds without shadowed copies, kept apart from its own.
_UNSHADOWED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def without_shadows() -> Iterator[None]:
    """Inside the block, no per-sample copies in the shadowed layout
    (:data:`ewc_reg.engines.loose.SHADOWED`): the modules of the loose parameters no other
    layout fits are units of their own parameters on the per-module fallback, as before; the
    arrangements found so are kept apart, across the block's calls."""
    layouts, kept = loose.LAYOUTS, hooks.HookEngine.arrangements
    loose.LAYOUTS = tuple(layout for layout in layouts if layout != loose.SHADOWED)
    hooks.HookEngine.arrangements = _UNSHADOWED
    try:
        yield
    finally:
        loose.LAYOUTS, hooks.HookEngine.arrangements = layouts, kept


@contextmanager
def with_whole_parents() -> Iterator[None]:
    """Inside the block, a module whose parameters take no per-sample copies is one unit of all
    the parameters inside it (:func:`ewc_reg.engines.recording.plan`'s ``whole_parents``)."""
    plan = recording.plan  # (what the hooks engine's Planner calls)
    recording.plan = lambda model, params, whole_parents=True, whole=(): plan(
        model, params, True, whole
    )
    try:
        yield
    finally:
        recording.plan = plan


#: Each baseline: the block it runs in, the file its table goes to, the models it is run on,
#: and the headers of the table's title and columns.
BASELINES = {
    "no-timm-rules": (
        without_timm_rules,
        "timm_speed.md",
        (
            "mobilenetv3_small_050",
            "resnetv2_18",
            "efficientnet_b0",
            "regnetx_002",
            "swiftformer_xs",
            "deit3_small_patch16_224",
            "convnextv2_atto",
            "hgnetv2_b0",
            "poolformerv2_s12",
        ),
        "timm's layers on rules, or on the per-module fallback",
        ("rules", "fallback"),
    ),
    "whole-parents": (
        with_whole_parents,
        "timm_parents_speed.md",
        ("convnext_atto", "convnext_nano"),
        "parents as units of their own parameters, or of all the parameters inside them",
        ("own", "whole"),
    ),
    "unshadowed": (
        without_shadows,
        "timm_shadows_speed.md",
        ("convnext_atto", "convnext_nano", "inception_next_atto"),
        "loose parameters in shadowed copies, or their modules on the per-module fallback",
        ("shadowed", "fallback"),
    ),
    "functorch": (
        on_backend("functorch"),
        "timm_functorch_speed.md",
        (
            "beit_base_patch16_224",
            "eva02_tiny_patch14_224",
            "vit_betwixt_patch16_rope_reg4_gap_256",
            "convit_tiny",
            "convnext_atto",
        ),
        "the hooks engine, or the whole-model functorch engine",
        ("hooks", "functorch"),
    ),
    "looped": (
        lambda: pull_back("looped"),
        "timm_pull_back_speed.md",
        (
            "efficientnet_b0",
            "mobilenetv3_small_050",
            "regnetx_002",
            "repvgg_a0",
            "ghostnet_100",
            "densenet121",
            "resnet18",
            "convnext_atto",
        ),
        "the pull-back batched in small passes (recorded outputs under 256 KiB a thread on "
        "average), or looped over the vectors in every pass (as before)",
        ("auto", "looped"),
    ),
    "loop": (
        on_backend("loop"),
        "timm_loop_speed.md",
        ("sequencer2d_s",),
        "the hooks engine, or the loop engine (one sample at a time)",
        ("hooks", "loop"),
    ),
}


def fisher(
    model: torch.nn.Module, data: list, method: str, baseline: str | None
) -> dict[str, torch.Tensor]:
    """The model's Fisher on the hooks engine as it is (``baseline=None``), or as the baseline
    (:data:`BASELINES`: a block that changes the engine, or yields the keywords of
    ``fisher_diagonal`` that choose another)."""
    with nullcontext() if baseline is None else BASELINES[baseline][0]() as keywords:
        return fisher_diagonal(model, data, method, **(keywords or {}))


def run(
    models: list[str], baseline: str, batch_size: int, size: int, repeats: int, threads: int
) -> list[str]:
    import timm  # (optional: only this benchmark needs it)

    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        sized = {"img_size": size} if name.startswith(SIZED) else {}
        model = timm.create_model(name, pretrained=False, num_classes=10, **sized).eval()
        x = torch.randn(batch_size, 3, size, size)
        data = [(x, torch.randint(0, 10, (batch_size,)))]
        for method in ("exact", "empirical"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timed = side_by_side(
                    {
                        way: partial(fisher, model, data, method, None if way == "on" else baseline)
                        for way in ("on", "off")
                    },
                    repeats,
                )
            (on, got), (off, want) = timed["on"], timed["off"]
            largest = max(f.abs().max().item() for f in want.values())
            diff = max(
                ((got[k] - want[k]).abs().max() / want[k].abs().max()).item()
                for k in want
                if want[k].abs().max().item() >= 1e-12 * largest
            )
            rows.append(
                f"| {name} | `{method}` | {on:.3f} | {off:.3f} | {on / off:.2f} | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument("--baseline", choices=list(BASELINES), default="no-timm-rules")
    parser.add_argument("--models", help="comma-separated timm names (default: the baseline's)")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--image-size", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument(
        "--out", type=Path,
        help="markdown file to write (default: the baseline's, for a run of its models at the "
        "default sizes; another run is printed only)",
    )
    args = parser.parse_args(argv)
    require(parser, ["timm"])
    _, file, models, title, (ours, theirs) = BASELINES[args.baseline]
    models = args.models.split(",") if args.models else list(models)
    with keeping_threads():
        rows = run(
            models, args.baseline, args.batch_size, args.image_size, args.repeats, args.threads
        )
    table = "\n".join(
        [
            f"# Fisher speed of timm models: {title}",
            "",
            f"{date.today()} · {machine(torch.device('cpu'))} · torch {torch.__version__} · "
            f"timm {metadata.version('timm')} · {args.threads} threads · float32 · C=10 · "
            f"B={args.batch_size} · {args.image_size}x{args.image_size} images · "
            f"medians of {args.repeats}",
            "",
            f"| model | method | {ours} (s) | {theirs} (s) | {ours} / {theirs} | max rel. diff |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    defaults = ("models", "batch_size", "image_size")  # (only such a run replaces the table)
    return write_report(table, report_file(parser, args, RESULTS / file, defaults))


if __name__ == "__main__":
    main()
