"""Which engine timm architectures get, and whether their Fisher agrees with the loop engine's.

For each of 108 timm architectures: the engine ``auto`` ends on, which of its modules go to the
per-module ``torch.func`` fallback, and whether its Fisher agrees with the loop engine's (plain
autograd, one sample at a time).

Run from the repository root (needs ``timm``, an optional import: ``pip install --no-deps timm``
beside the pinned torch; about 45 minutes on one core)::

    python -m benchmarks.timm_coverage            # writes benchmarks/results/timm_coverage.md
    python -m benchmarks.timm_coverage --cases resnet18,convnext_atto --out /tmp/cover.md
    python -m benchmarks.timm_coverage --batch-size 4 --out /tmp/cover4.md

Without ``--out``, only a run of all the architectures at the default batch size writes its
table (to ``benchmarks/results/timm_coverage.md``); other runs print it.

Each architecture runs in its own process (:mod:`._coverage`; a crash or a hang costs that row
only, ``--timeout`` seconds at most): ``timm.create_model(name, num_classes=5, **settings)``
in float64 and eval mode, parameters that start at zero drawn from N(0, 0.05²) (a layer scale
or response norm at 0 would hide the layers before it), batch norms given the running
statistics of 8 random images (with random statistics, deep networks' logits grew so large
that the softmax saturated and the Fisher was 0), and one batch of 3 random images
(``--batch-size``) with random labels. The ``exact`` Fisher is computed with
``backend="auto"`` and with ``backend="loop"``, as :func:`._coverage.measure` says."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _coverage

RESULTS = Path(__file__).parent / "results" / "timm_coverage.md"
_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
_SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 32, "depths": (2, 2), "num_heads": (1, 2)}
#: The architectures, each with the settings that make it small and the size of its images.
ARCHITECTURES: dict[str, tuple[dict[str, Any], int]] = {
    **{name: ({}, 32) for name in (
        "resnet10t", "resnet18", "skresnet18", "resnetv2_18", "ecaresnet26t", "resnest14d",
        "gcresnet33ts", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv2_050",
        "mobilenetv4_conv_small_050", "lcnet_050", "tinynet_e", "hardcorenas_a", "rexnet_100",
        "ghostnet_050", "repghostnet_050", "regnetx_002", "regnety_002",
        "densenet121", "repvgg_a0", "fastvit_t8",
        "gernet_s", "selecsls42b", "ese_vovnet19b_slim", "dpn48b", "nf_regnet_b0",
        "nf_resnet26", "test_nfnet", "convnext_atto", "convnextv2_atto", "inception_next_atto",
        "rdnet_tiny", "mambaout_femto", "starnet_s050", "hgnetv2_b0", "cspnext_tiny",
        "poolformer_s12", "poolformerv2_s12", "edgenext_xx_small", "efficientvit_b0",
        "pvt_v2_b0", "twins_svt_small", "davit_tiny", "focalnet_tiny_srf", "repvit_m0_9",
        "fasternet_t0", "swiftformer_xs", "sequencer2d_s", "test_vit", "test_vit2", "test_vit4",
        "test_efficientnet_ln", "test_efficientnet_gn", "test_efficientnet_evos",
        "test_byobnet", "test_convnext2", "test_convnext3", "test_mambaout",
        "tf_mobilenetv3_small_minimal_100",  # (TensorFlow's "SAME" padding: Conv2dSame)
    )},
    **{name: ({"img_size": 64}, 64) for name in (
        "botnet26t_256", "lambda_resnet26t", "efficientvit_m0", "levit_128s", "levit_conv_128s",
        "coatnet_pico_rw_224", "maxvit_rmlp_pico_rw_256", "maxxvitv2_nano_rw_256",
        "gcvit_xxtiny", "hiera_tiny_224", "vitamin_small_224",
    )},
    **{name: ({}, 64) for name in (
        "hrnet_w18_small", "mobilevit_xxs", "mobilevitv2_050", "shvit_s1", "csatv2",
        "ghostnetv2_100", "dla46_c", "dla34", "mobileone_s0",  # (at 32 px: maps of 0, Fisher 0)
    )},
    **{name: (_VIT, 32) for name in (
        "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
        "vit_medium_patch16_gap_256", "vit_relpos_small_patch16_224",
        "vit_small_patch16_rope_224", "vit_betwixt_patch16_rope_reg4_gap_256",
        "vit_base_patch16_siglip_224", "flexivit_small", "vit_small_patch16_18x2_224",
        "beit_base_patch16_224", "beitv2_base_patch16_224",
    )},
    "inception_v3": ({}, 128),
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


def measure_architecture(name: str, batch_size: int = 3) -> dict[str, Any]:
    """:func:`._coverage.measure` on timm's ``name`` with a batch of ``batch_size`` images (see
    the module docstring), or why it could not be made or run (``"error"``)."""
    import timm  # (optional: only this benchmark needs it)

    settings, size = ARCHITECTURES[name]
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
                    m.reset_running_stats()
                    m.momentum = None  # (the running statistics: the average over the pass)
            model.train()(torch.randn(8, 3, size, size, dtype=torch.float64))
            model.eval()
            x = torch.randn(batch_size, 3, size, size, dtype=torch.float64)
            model(x)
    except Exception as error:  # (settings this version of timm rejects)
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    return _coverage.measure(model, [(x, torch.randint(0, 5, (batch_size,)))])


def _header(threads: int, batch_size: int) -> tuple[str, str, str]:
    return (
        "Engines of timm architectures: `exact`, `auto` against `loop`",
        f"timm {metadata.version('timm')} · {threads} thread(s) · float64 · C=5 · "
        f"B={batch_size}",
        "architecture",
    )


def main(argv: list[str] | None = None) -> str | None:
    return _coverage.main(
        argv, __doc__, "benchmarks.timm_coverage",
        dict.fromkeys(ARCHITECTURES, ("timm",)),
        measure_architecture, _header, RESULTS,
        sizes={"batch_size": (3, 1, "images per batch")},
    )


if __name__ == "__main__":
    main()
