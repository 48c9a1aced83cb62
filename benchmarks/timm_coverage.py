"""Which engine each of ~120 timm architectures gets, which of its modules go to the per-module
``torch.func`` fallback, and whether its Fisher agrees with the loop engine's (plain autograd,
one sample at a time).

Run from the repository root (needs ``timm``, an optional import: ``pip install --no-deps timm``
beside the pinned torch; about 45 minutes on one core)::

    python -m benchmarks.timm_coverage            # writes benchmarks/results/timm_coverage.md
    python -m benchmarks.timm_coverage --models resnet18,convnext_atto --out /tmp/cover.md

Each architecture runs in its own process (a crash or a hang costs that row only, ``--timeout``
seconds at most): ``timm.create_model(name, num_classes=5, **settings)`` in float64 and eval
mode, parameters that start at zero drawn from N(0, 0.05²) (a layer scale or response norm
at 0 would hide the layers before it), batch norms given random running statistics, and one
batch of 3 random images with random labels. The ``exact`` Fisher is computed with
``backend="auto"`` and with ``backend="loop"``; the engine ``auto`` ends on and the modules it
sends to the per-module fallback are read from the library's log (loggers ``"ewc_reg"`` and
``"ewc_reg.fallback"``). The difference is the largest over the parameters of
``max|auto - loop| / max|loop|``, the denominator at least 1e-12 of the largest entry of the
whole Fisher (a bias before a softmax has a Fisher of 0 but for rounding)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ewc_reg import fisher_diagonal

from ._reports import keeping_threads, machine, write_report

RESULTS = Path(__file__).parent / "results" / "timm_coverage.md"
_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
_SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 32, "depths": (2, 2), "num_heads": (1, 2)}
#: The architectures, each with the settings that make it small and the size of its images.
ARCHITECTURES: dict[str, tuple[dict[str, Any], int]] = {
    **{name: ({}, 32) for name in (
        "resnet10t", "resnet18", "skresnet18", "resnetv2_18", "ecaresnet26t", "resnest14d",
        "gcresnet33ts", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv2_050",
        "mobilenetv4_conv_small_050", "lcnet_050", "tinynet_e", "hardcorenas_a", "rexnet_100",
        "ghostnet_050", "ghostnetv2_100", "repghostnet_050", "regnetx_002", "regnety_002",
        "densenet121", "dla46_c", "dla34", "repvgg_a0", "mobileone_s0", "fastvit_t8",
        "gernet_s", "selecsls42b", "ese_vovnet19b_slim", "dpn48b", "nf_regnet_b0",
        "nf_resnet26", "test_nfnet", "convnext_atto", "convnextv2_atto", "inception_next_atto",
        "rdnet_tiny", "mambaout_femto", "starnet_s050", "hgnetv2_b0", "cspnext_tiny",
        "poolformer_s12", "poolformerv2_s12", "edgenext_xx_small", "efficientvit_b0",
        "pvt_v2_b0", "twins_svt_small", "davit_tiny", "focalnet_tiny_srf", "repvit_m0_9",
        "fasternet_t0", "swiftformer_xs", "sequencer2d_s", "test_vit", "test_vit2", "test_vit4",
        "test_efficientnet_ln", "test_efficientnet_gn", "test_efficientnet_evos",
        "test_byobnet", "test_convnext2", "test_convnext3", "test_mambaout",
    )},
    **{name: ({"img_size": 64}, 64) for name in (
        "botnet26t_256", "lambda_resnet26t", "efficientvit_m0", "levit_128s", "levit_conv_128s",
        "coatnet_pico_rw_224", "maxvit_rmlp_pico_rw_256", "maxxvitv2_nano_rw_256",
        "gcvit_xxtiny", "hiera_tiny_224", "vitamin_small_224",
    )},
    **{name: ({}, 64) for name in (
        "hrnet_w18_small", "mobilevit_xxs", "mobilevitv2_050", "shvit_s1", "csatv2",
    )},
    **{name: (_VIT, 32) for name in (
        "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
        "vit_medium_patch16_gap_256", "vit_relpos_small_patch16_224",
        "vit_small_patch16_rope_224", "vit_betwixt_patch16_rope_reg4_gap_256",
        "vit_base_patch16_siglip_224", "flexivit_small", "vit_small_patch16_18x2_224",
        "beit_base_patch16_224", "beitv2_base_patch16_224",
    )},
    "inception_v3": ({}, 80),
    "coat_lite_tiny": ({"img_size": 32}, 32),
    "volo_d1_224": ({"img_size": 32}, 32),
    "pit_ti_224": ({"img_size": 32}, 32),
    "mvitv2_tiny": ({"img_size": 32}, 32),
    "nest_tiny": ({"img_size": 32, "patch_size": 2}, 32),
    "vit_tiny_r_s16_p8_224": ({"img_size": 64, "depth": 2}, 64),
    "eva02_tiny_patch14_224": ({**_VIT, "img_size": 28, "patch_size": 7}, 28),
    "cait_xxs24_224": ({**_VIT, "depth_token_only": 1}, 32),
    "xcit_nano_12_p16_224": ({"img_size": 32, "depth": 2}, 32),
    "convit_tiny": ({**_VIT, "local_up_to_layer": 1}, 32),
    "tnt_s_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "swin_tiny_patch4_window7_224": (_SWIN, 32),
    "swinv2_tiny_window8_256": (_SWIN, 32),
    "swinv2_cr_tiny_224": ({**_SWIN, "img_size": (32, 32)}, 32),
    "samvit_base_patch16": (
        {**_VIT, "img_size": 64, "global_attn_indexes": (1,), "window_size": 4}, 64
    ),
}


class _Messages(logging.Handler):
    """Keeps the messages of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.name, record.getMessage()))


def engine_and_fallbacks(messages: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """The engine the messages say ``auto`` ended on (``"hooks"`` unless one says it used
    another), and the classes of the modules they say went to the per-module fallback."""
    engine = "hooks"
    for _, message in messages:
        used = re.search(r"using the (\w+) engine", message)
        if used:
            engine = used.group(1)
    classes = [
        found.group(1)
        for name, message in messages
        if name == "ewc_reg.fallback"
        for found in [re.search(r"\(([\w, ]+)\): its per-sample gradients", message)]
        if found
    ]
    return engine, classes


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """``max_p max|got_p - want_p| / max|want_p|``, each denominator at least 1e-12 of the
    largest entry of ``want``."""
    largest = max(t.abs().max().item() for t in want.values() if t.numel())
    return max(
        (got[name] - t).abs().max().item() / max(t.abs().max().item(), 1e-12 * largest)
        for name, t in want.items()
        if t.numel()
    )


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The engine ``auto`` ends on for ``model``'s ``exact`` Fisher on ``(x, y)``, the classes
    of its modules on the per-module fallback, its difference from the loop engine's Fisher
    (:func:`relative_difference`) and the two times."""
    handler = _Messages()  # (on "ewc_reg", which "ewc_reg.fallback" propagates to)
    loggers = [logging.getLogger(name) for name in ("ewc_reg", "ewc_reg.fallback")]
    levels = [logger.level for logger in loggers]
    loggers[0].addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        start = time.perf_counter()
        auto = fisher_diagonal(model, [(x, y)], "exact")
        auto_time = time.perf_counter() - start
    finally:
        loggers[0].removeHandler(handler)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    start = time.perf_counter()
    loop = fisher_diagonal(model, [(x, y)], "exact", backend="loop")
    loop_time = time.perf_counter() - start
    engine, fallbacks = engine_and_fallbacks(handler.messages)
    return {
        "engine": engine,
        "fallbacks": fallbacks,
        "difference": relative_difference(auto, loop),
        "auto_s": auto_time,
        "loop_s": loop_time,
    }


def measure_architecture(name: str) -> dict[str, Any]:
    """:func:`measure` on timm's ``name`` (see the module docstring), or why it could not be
    made or run (``"error"``)."""
    import timm  # (optional: only this benchmark needs it)

    settings, size = ARCHITECTURES.get(name, ({}, 32))
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, **settings)
        model = model.double().eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not p.abs().max():
                    p.normal_(0, 0.05)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            x = torch.randn(3, 3, size, size, dtype=torch.float64)
            model(x)
    except Exception as error:  # (settings this version of timm rejects)
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    return measure(model, x, torch.randint(0, 5, (3,)))


def _row(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"| {name} | not run: {result['error'].splitlines()[0]} | | | | |"
    fallbacks = ", ".join(
        f"{cls} ×{count}" if count > 1 else cls
        for cls, count in sorted(Counter(result["fallbacks"]).items())
    )
    return (
        f"| {name} | {result['engine']} | {fallbacks or '–'} | {result['difference']:.1e} | "
        f"{result['auto_s']:.2f} | {result['loop_s']:.2f} |"
    )


def run(models: list[str], timeout: float, threads: int) -> dict[str, dict[str, Any]]:
    """Each architecture's result (:func:`measure_architecture`), each in its own process."""
    results = {}
    for name in models:
        command = [sys.executable, "-m", "benchmarks.timm_coverage", "--one", name,
                   "--threads", str(threads)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout,
                cwd=Path(__file__).parent.parent,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = (
                json.loads(lines[-1]) if lines
                else {"error": f"exit {done.returncode}: {done.stderr.strip()[-150:]}"}
            )
        except subprocess.TimeoutExpired:
            result = {"error": f"over {timeout:g} s"}
        results[name] = result
        print(_row(name, result), flush=True)
    return results


def report(results: dict[str, dict[str, Any]], threads: int) -> str:
    """The markdown table of ``results``, with its header and counts."""
    ran = {name: r for name, r in results.items() if "error" not in r}
    engines = Counter(r["engine"] for r in ran.values())
    clean = sum(1 for r in ran.values() if r["engine"] == "hooks" and not r["fallbacks"])
    worst = max((r["difference"] for r in ran.values()), default=float("nan"))
    return "\n".join(
        [
            "# Engines of timm architectures: `exact`, `auto` against `loop`",
            "",
            f"{date.today()} · {machine(torch.device('cpu'))} · torch {torch.__version__} · "
            f"timm {metadata.version('timm')} · {threads} thread(s) · float64 · C=5 · B=3",
            "",
            f"{len(ran)} of {len(results)} ran: "
            + ", ".join(f"{count} on {engine}" for engine, count in engines.most_common())
            + f"; {clean} on hooks with no module on the per-module fallback; largest "
            f"difference from the loop engine {worst:.1e}.",
            "",
            "| architecture | engine | modules on the per-module fallback | difference from loop "
            "| auto (s) | loop (s) |",
            "|---|---|---|---:|---:|---:|",
            *(_row(name, result) for name, result in results.items()),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm names (default: ARCHITECTURES)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per architecture")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (the child process's architecture)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.timeout <= 0:
        parser.error("--threads must be at least 1 and --timeout positive")
    if args.one:
        with keeping_threads():
            torch.set_num_threads(args.threads)
            print(json.dumps(measure_architecture(args.one)), flush=True)
        return None
    models = args.models.split(",") if args.models else list(ARCHITECTURES)
    return write_report(report(run(models, args.timeout, args.threads), args.threads), args.out)


if __name__ == "__main__":
    main()
