"""Which engine Hugging Face models get, and whether their Fisher agrees with the loop engine's.

For each of Hugging Face's transformers architectures (text classifiers built on encoders,
decoders and encoder-decoders, and image classifiers): the engine ``auto`` ends on, which of its
modules go to the per-module ``torch.func`` fallback, and whether its Fisher agrees with the
loop engine's (plain autograd, one sample at a time).

Run from the repository root (needs ``transformers``, an optional import: ``pip install
--no-deps transformers tokenizers huggingface_hub safetensors`` beside the pinned torch;
about ten minutes on one core)::

    python -m benchmarks.transformers_coverage     # writes results/transformers_coverage.md
    python -m benchmarks.transformers_coverage --cases bert,llama --out /tmp/hf.md
    python -m benchmarks.transformers_coverage --batch-size 5 --length 10 --out /tmp/hf.md

Without ``--out``, only a run of all the architectures at the default sizes writes its table;
other runs print it.

Each architecture runs in its own process (:mod:`._coverage`): the model made from its
configuration (no download), made small (:func:`small_config`: 2 layers, width 32, 2 heads, a
vocabulary of 64 tokens, 32×32 images), with a head of 5 classes
(``AutoModelForSequenceClassification`` or ``AutoModelForImageClassification``), in float64
and eval mode, parameters that start at zero drawn from N(0, 0.05²) (a zero-initialised layer
scale or output layer would hide the layers before it), and one batch of ``B = 3`` samples
(``--batch-size``): token ids ``(B, T)``, ``T = 6`` (``--length``), each sample's last one 2
(the end of a sequence), with an attention mask that pads the first sample's last 2 tokens
(text), or random images. The ``exact`` Fisher of all parameters is computed with
``backend="auto"`` and with ``backend="loop"``, as :func:`._coverage.measure` says; the
model's output is its ``logits``.

Left out: Mixtral (its experts' grouped matrix product takes no float64), DeiT and LeViT (each
has two image classifiers, with and without a distillation head, and a configuration alone
does not name one) and CvT (its settings index stages beyond the two made here)."""

from __future__ import annotations

import contextlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _coverage

RESULTS = Path(__file__).parent / "results" / "transformers_coverage.md"
#: The options of the batch's sizes: their defaults, least values and help.
SIZES = {
    "batch_size": (3, 1, "samples per batch"),
    "length": (6, 3, "tokens per text sample"),
}

#: Text classifiers (``AutoModelForSequenceClassification``), by ``model_type``, each with the
#: settings that make it small beyond :data:`_SMALL` (those it names otherwise).
TEXT: dict[str, dict[str, Any]] = {
    # encoders
    "bert": {},
    "roberta": {},
    "distilbert": {"dim": 32, "hidden_dim": 48, "n_layers": 2, "n_heads": 2},
    "albert": {"embedding_size": 16},  # (one layer's parameters shared by every layer)
    "electra": {"embedding_size": 16},
    "deberta": {"pooler_hidden_size": 32},
    "deberta-v2": {"pooler_hidden_size": 32},
    "xlm-roberta": {},
    "mpnet": {},
    "convbert": {"embedding_size": 32},
    "funnel": {"block_sizes": [1, 1], "d_model": 32, "n_head": 2, "d_head": 16, "d_inner": 48},
    "mobilebert": {"embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16},
    "roformer": {"embedding_size": 32},
    "megatron-bert": {},
    "ernie": {},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 4},
    # decoders
    "gpt2": {},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "gptj": {"rotary_dim": 8},
    "gpt_neox": {},
    "gpt_bigcode": {},
    "opt": {"word_embed_proj_dim": 32, "ffn_dim": 48},
    "bloom": {},
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "phi": {},
    "phi3": {},
    "falcon": {},
    "mpt": {"d_model": 32, "n_heads": 2, "n_layers": 2},
    "stablelm": {},
    "starcoder2": {},
    "olmo": {},
    "biogpt": {},
    # encoder-decoders
    "bart": {},
    "mbart": {},
    "t5": {"d_ff": 48, "d_kv": 16, "num_decoder_layers": 2, "decoder_start_token_id": 0},
}

#: Image classifiers (``AutoModelForImageClassification``), alike.
IMAGES: dict[str, dict[str, Any]] = {
    "vit": {},
    "beit": {"use_relative_position_bias": True},
    "data2vec-vision": {},
    "dinov2": {},
    "swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 2},
    "swinv2": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 2},
    "convnext": {"hidden_sizes": [8, 16], "depths": [1, 1]},
    "convnextv2": {"hidden_sizes": [8, 16], "depths": [1, 1]},
    "resnet": {"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8},
    "regnet": {"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8, "groups_width": 8},
    "bit": {"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8, "num_groups": 4},
    "mobilenet_v2": {"depth_multiplier": 0.25},
    "mobilevit": {"hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]},
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320},
    "poolformer": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_encoder_blocks": 2},
    "segformer": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_encoder_blocks": 2,
                  "sr_ratios": [2, 1], "num_attention_heads": [1, 2], "patch_sizes": [7, 3],
                  "strides": [4, 2], "mlp_ratios": [2, 2]},
    "focalnet": {"embed_dim": 16, "depths": [1, 1], "focal_levels": [2, 2],
                 "focal_windows": [3, 3]},
    "pvt_v2": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_encoder_blocks": 2,
               "sr_ratios": [2, 1], "num_attention_heads": [1, 2], "patch_sizes": [7, 3],
               "strides": [4, 2], "mlp_ratios": [2, 2]},
}

#: What makes every configuration small, where it has the setting (by name, or by the name its
#: ``attribute_map`` gives it: GPT-2's ``n_embd`` is its ``hidden_size``).
_SMALL: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
}

CASES = [*TEXT, *IMAGES]


def small_config(model_type: str, **sizes: Any) -> Any:
    """The configuration of ``model_type``, small (:data:`_SMALL`, with ``sizes`` in place of
    its values, and the architecture's own settings), with 5 classes, token 0 for padding and
    token 2 for the end of a sequence."""
    import transformers  # (optional: only this benchmark needs it)

    config = transformers.AutoConfig.for_model(model_type)
    mapped = getattr(config, "attribute_map", {})
    own = {**TEXT, **IMAGES}[model_type]
    for name, value in {**_SMALL, **sizes}.items():
        if name not in own and (hasattr(config, name) or name in mapped):
            with contextlib.suppress(NotImplementedError):  # (Funnel's derived settings)
                setattr(config, name, value)
    for name, value in own.items():
        setattr(config, name, value)
    config.num_labels = 5
    config.pad_token_id, config.eos_token_id = 0, 2
    return config


class Logits(nn.Module):
    """A transformers classifier returning its ``logits`` alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


def classifier(model_type: str, dtype: torch.dtype = torch.float64, **sizes: Any) -> nn.Module:
    """The classifier of ``model_type`` made from :func:`small_config` (``sizes`` passed on) in
    ``dtype`` and eval mode, its parameters that start at zero drawn from N(0, 0.05²), returning
    its ``logits`` (:class:`Logits`)."""
    import transformers

    auto = (
        transformers.AutoModelForImageClassification
        if model_type in IMAGES
        else transformers.AutoModelForSequenceClassification
    )
    model = Logits(auto.from_config(small_config(model_type, **sizes))).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.abs().max():
                p.normal_(0, 0.05)
    return model


def inputs(
    model_type: str, batch_size: int, length: int, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """The inputs of one batch of ``batch_size`` samples, ``length`` tokens each where they are
    text (see the module docstring), images in ``dtype``."""
    if model_type in IMAGES:
        return {"pixel_values": torch.randn(batch_size, 3, 32, 32, dtype=dtype)}
    ids = torch.randint(3, 64, (batch_size, length))
    mask = torch.ones(batch_size, length, dtype=torch.long)
    ids[:, -1] = 2  # (BART's and T5's classifiers read the hidden state at the end token)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def measure_architecture(model_type: str, batch_size: int = 3, length: int = 6) -> dict[str, Any]:
    """:func:`._coverage.measure` on the classifier of ``model_type`` with a batch of
    ``batch_size`` samples of ``length`` tokens (see the module docstring), or why it could not
    be made or run (``"error"``)."""
    torch.manual_seed(0)
    try:
        model = classifier(model_type)
        batch = inputs(model_type, batch_size, length)
        with torch.no_grad():
            model(**batch)
    except Exception as error:  # (no transformers; settings this version of it rejects)
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    labels = torch.randint(0, 5, (batch_size,))
    return _coverage.measure(model, [{**batch, "labels": labels}])


def _header(threads: int, batch_size: int, length: int) -> tuple[str, str, str]:
    return (
        "Engines of Hugging Face transformers classifiers: `exact`, `auto` against `loop`",
        f"transformers {metadata.version('transformers')} · {threads} thread(s) · float64 · "
        f"C=5 · B={batch_size} · T={length} (text)",
        "model type",
    )


def main(argv: list[str] | None = None) -> str | None:
    return _coverage.main(
        argv, __doc__, "benchmarks.transformers_coverage",
        dict.fromkeys(CASES, ("transformers",)), measure_architecture, _header, RESULTS, SIZES,
    )


if __name__ == "__main__":
    main()
