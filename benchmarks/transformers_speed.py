"""Speed of the Fisher of Hugging Face classifiers on ``auto``, against a baseline (``--baseline``).

The baseline is the engine they went to before (``--baseline loop``, the default, or
``functorch``): MPNet, whose relative position bias is ``expand``ed to the batch size before it
meets the attention scores, went to the loop engine until its shadowed per-sample copies met
each sample with its own rows (:mod:`ewc_reg.engines.shadows`). BERT, on the hooks engine all
along, is the reference of an encoder without them.

Run from the repository root (needs ``transformers``, an optional import: ``pip install
--no-deps transformers tokenizers huggingface_hub safetensors`` beside the pinned torch)::

    python -m benchmarks.transformers_speed      # writes results/transformers_speed.md
    python -m benchmarks.transformers_speed --baseline functorch  # ..._functorch_speed.md
    python -m benchmarks.transformers_speed --models mpnet --batch-size 8 --length 32 --width 64

Each model is the classifier of :mod:`.transformers_coverage` (its :func:`small_config`,
:func:`classifier` and :func:`inputs`: 2 layers, 5 classes, eval mode, random token ids with
the first sample's last 2 tokens padded) with ``--width`` hidden units, ``4 × width`` in the
feed-forward layers and 4 heads, in float32. For each of ``exact`` and ``empirical``, ``auto``
and the baseline run side by side in one process (:func:`._timing.side_by_side`: one call of
each first, which pays the checks, then rounds in reverse order every other round; medians),
and their Fisher diagonals are compared (:func:`._coverage.relative_difference`)."""

from __future__ import annotations

import warnings
from datetime import date
from functools import partial
from importlib import metadata
from pathlib import Path

import torch

from ewc_reg import fisher_diagonal

from . import _coverage
from ._reports import (
    at_least,
    command_line,
    keeping_threads,
    machine,
    report_file,
    write_report,
)
from ._timing import side_by_side
from .transformers_coverage import CASES, classifier, inputs

RESULTS = Path(__file__).parent / "results"
#: Each baseline, with the file its table goes to without ``--out``.
BASELINES = {"loop": "transformers_speed.md", "functorch": "transformers_functorch_speed.md"}


def run(
    models: list[str], baseline: str, batch_size: int, length: int, width: int, repeats: int
) -> list[str]:
    """One markdown row per model and estimator (see the module docstring)."""
    rows = []
    for model_type in models:
        torch.manual_seed(0)
        model = classifier(
            model_type, torch.float32, hidden_size=width, intermediate_size=4 * width,
            num_attention_heads=4, max_position_embeddings=max(64, length + 2),
        )
        batch = inputs(model_type, batch_size, length, torch.float32)
        data = [{**batch, "labels": torch.randint(0, 5, (batch_size,))}]
        for method in ("exact", "empirical"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timed = side_by_side(
                    {
                        way: partial(fisher_diagonal, model, data, method, backend=way)
                        for way in ("auto", baseline)
                    },
                    repeats,
                )
            (ours, got), (theirs, want) = timed["auto"], timed[baseline]
            difference = _coverage.relative_difference(got, want)
            rows.append(
                f"| {model_type} | `{method}` | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} "
                f"| {difference:.1e} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument("--baseline", choices=list(BASELINES), default="loop")
    parser.add_argument("--models", default="mpnet,bert", help="comma-separated model types")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--length", type=at_least(3), default=128, help="tokens per sample")
    parser.add_argument("--width", type=at_least(4), default=256, help="hidden units")
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument(
        "--out", type=Path,
        help="markdown file to write (default: the baseline's in benchmarks/results, "
        f"{', '.join(f'{file} for {name}' for name, file in BASELINES.items())}, for a run "
        "of the default models and sizes; another run is printed only)",
    )
    args = parser.parse_args(argv)
    if args.width % 4:
        parser.error("--width must be a multiple of 4 (the heads)")
    unknown = sorted(set(args.models.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--models: no classifier for {unknown}; choose among {CASES}")
    _coverage.require(parser, ["transformers"])
    with keeping_threads():
        torch.set_num_threads(args.threads)
        rows = run(
            args.models.split(","), args.baseline, args.batch_size, args.length, args.width,
            args.repeats,
        )
    table = "\n".join(
        [
            f"# Fisher speed of Hugging Face classifiers: `auto` against `{args.baseline}`",
            "",
            f"{date.today()} · {machine(torch.device('cpu'))} · torch {torch.__version__} · "
            f"transformers {metadata.version('transformers')} · {args.threads} threads · "
            "float32 · C=5 · "
            f"B={args.batch_size} · T={args.length} · width {args.width} · medians of "
            f"{args.repeats}",
            "",
            f"| model type | method | auto (s) | {args.baseline} (s) | auto / {args.baseline} "
            "| max rel. diff |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    defaults = ("models", "batch_size", "length", "width")  # (only such a run replaces it)
    return write_report(
        table, report_file(parser, args, RESULTS / BASELINES[args.baseline], defaults)
    )


if __name__ == "__main__":
    main()
