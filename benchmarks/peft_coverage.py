"""Which engine PEFT-adapted models get, and whether their Fisher agrees with the loop engine's.

For models with PEFT adapters (LoRA and its variants, IA3, LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA,
FourierFT, HRA; on MLPs, a CNN, an embedding, a timm ViT and Hugging Face's BERT, GPT-2, Llama
and OPT): the engine ``auto`` ends on, which of their modules go to the per-module
``torch.func`` fallback, and whether their Fisher agrees with the loop engine's.

Run from the repository root (needs ``peft``, and ``transformers`` and ``timm`` for the cases
built on them, optional imports: ``pip install --no-deps peft transformers timm`` beside the
pinned torch; a few minutes)::

    python -m benchmarks.peft_coverage            # writes benchmarks/results/peft_coverage.md
    python -m benchmarks.peft_coverage --cases mlp_lora,gpt2_lora --out /tmp/peft.md
    python -m benchmarks.peft_coverage --batch-size 4 --out /tmp/peft_b4.md

The packages the cases chosen need must import before the run (the error names the command
that installs them). Without ``--out``, only a run of all the cases at the default batch size
writes its table; other runs print it.

Each case runs in its own process (:mod:`._coverage`): the adapted model in float64 and eval
mode, its adapter parameters (the trainable ones) moved off their initial values (LoRA's ``B``
starts at 0, which would hide ``A``), and one batch of ``--batch-size`` samples (default 3;
sequences of 6 tokens for the language models, 7 for BERT). The ``exact`` Fisher of the
trainable parameters is computed with ``backend="auto"`` and with ``backend="loop"``, as
:func:`._coverage.measure` says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _coverage

RESULTS = Path(__file__).parent / "results" / "peft_coverage.md"


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5)
    )


def _classes(shape: tuple[int, ...], batch: int) -> list[Any]:
    return [(torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 5, (batch,)))]


def _lora_mlp(batch: int, **settings: Any) -> tuple[nn.Module, list[Any]]:
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], **settings)
    return peft.get_peft_model(_mlp(), config), _classes((6,), batch)


def _adapter_mlp(
    make_config: Callable[[Any], Any],
) -> Callable[[int], tuple[nn.Module, list[Any]]]:
    """The case of the MLP with the adapter ``make_config(peft)`` configures."""

    def build(batch: int) -> tuple[nn.Module, list[Any]]:
        import peft

        return peft.get_peft_model(_mlp(), make_config(peft)), _classes((6,), batch)

    return build


def _lora_cnn(batch: int, **settings: Any) -> tuple[nn.Module, list[Any]]:
    import peft

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    config = peft.LoraConfig(r=2, target_modules=["0", "2", "6"], **settings)
    return peft.get_peft_model(net, config), _classes((3, 8, 8), batch)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def _lora_embedding(batch: int) -> tuple[nn.Module, list[Any]]:
    import peft

    model = peft.get_peft_model(_Bag(), peft.LoraConfig(r=2, target_modules=["emb", "fc"]))
    return model, [(torch.randint(0, 20, (batch, 4)), torch.randint(0, 5, (batch,)))]


def _lora_vit(batch: int, **settings: Any) -> tuple[nn.Module, list[Any]]:
    import peft
    import timm

    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
        depth=2, embed_dim=64, num_heads=2,
    )
    config = peft.LoraConfig(r=2, target_modules=["qkv", "fc1"], **settings)
    return peft.get_peft_model(net, config), _classes((3, 32, 32), batch)


def _lora_bert(batch: int) -> tuple[nn.Module, list[Any]]:
    import peft
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=5, max_position_embeddings=32,
    )
    net = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    ids, mask = torch.randint(0, 50, (batch, 7)), torch.ones(batch, 7, dtype=torch.long)
    mask[0, 5:] = 0
    labels = torch.randint(0, 5, (batch,))
    return peft.get_peft_model(net, lora), [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ]


def _lora_causal_lm(batch: int, family: str) -> tuple[nn.Module, list[Any]]:
    import peft
    import transformers as hf

    vocab = 11
    if family == "gpt2":
        config = hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=16)
        net, targets = hf.GPT2LMHeadModel(config), ["c_attn", "c_fc"]
    elif family == "llama":
        config = hf.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=16,
        )
        net, targets = hf.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"]
    else:
        config = hf.OPTConfig(
            num_hidden_layers=2, hidden_size=32, ffn_dim=48, num_attention_heads=2,
            vocab_size=vocab, max_position_embeddings=16, word_embed_proj_dim=32,
        )
        net, targets = hf.OPTForCausalLM(config), ["q_proj", "v_proj", "fc1"]
    lora = peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM")
    ids, mask = torch.randint(0, vocab, (batch, 6)), torch.ones(batch, 6, dtype=torch.long)
    mask[0, 4:] = 0
    labels = torch.randint(0, vocab, (batch, 6))
    return peft.get_peft_model(net, lora), [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ]


#: The cases, each building its adapted model and its data of a batch size.
CASES: dict[str, Callable[[int], tuple[nn.Module, list[Any]]]] = {
    "mlp_lora": _lora_mlp,
    "mlp_lora_rslora": lambda b: _lora_mlp(b, use_rslora=True),
    "mlp_lora_bias": lambda b: _lora_mlp(b, lora_bias=True),
    "mlp_lora_dropout": lambda b: _lora_mlp(b, lora_dropout=0.1),
    "mlp_lora_saved_head": lambda b: _lora_mlp(b, modules_to_save=["4"]),
    "mlp_dora": lambda b: _lora_mlp(b, use_dora=True),
    "cnn_lora": _lora_cnn,
    "cnn_dora": lambda b: _lora_cnn(b, use_dora=True),
    "embedding_lora": _lora_embedding,
    "vit_lora": _lora_vit,
    "vit_dora": lambda b: _lora_vit(b, use_dora=True),
    "bert_lora": _lora_bert,
    "gpt2_lora": lambda b: _lora_causal_lm(b, "gpt2"),
    "llama_lora": lambda b: _lora_causal_lm(b, "llama"),
    "opt_lora": lambda b: _lora_causal_lm(b, "opt"),
    "mlp_ia3": _adapter_mlp(
        lambda peft: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])
    ),
    "mlp_loha": _adapter_mlp(lambda peft: peft.LoHaConfig(r=2, target_modules=["0", "2"])),
    "mlp_lokr": _adapter_mlp(lambda peft: peft.LoKrConfig(r=2, target_modules=["0", "2"])),
    "mlp_vera": _adapter_mlp(lambda peft: peft.VeraConfig(r=2, target_modules=["2"])),
    "mlp_oft": _adapter_mlp(
        lambda peft: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["2"])
    ),
    "mlp_boft": _adapter_mlp(
        lambda peft: peft.BOFTConfig(boft_block_size=4, target_modules=["2"])
    ),
    "mlp_adalora": _adapter_mlp(
        lambda peft: peft.AdaLoraConfig(
            init_r=2, target_r=1, total_step=10, target_modules=["0", "2"]
        )
    ),
    "mlp_fourierft": _adapter_mlp(
        lambda peft: peft.FourierFTConfig(n_frequency=8, target_modules=["2"])
    ),
    "mlp_hra": _adapter_mlp(lambda peft: peft.HRAConfig(r=2, target_modules=["2"])),
}


#: The cases built on timm's or transformers' models, by the package.
_BUILT_ON = {
    "timm": ("vit_lora", "vit_dora"),
    "transformers": ("bert_lora", "gpt2_lora", "llama_lora", "opt_lora"),
}
#: The optional packages each case imports (:data:`._coverage.INSTALL`).
PACKAGES = {
    name: ("peft", *(package for package, cases in _BUILT_ON.items() if name in cases))
    for name in CASES
}


def measure_case(name: str, batch_size: int = 3) -> dict[str, Any]:
    """:func:`._coverage.measure` on the case ``name`` with a batch of ``batch_size`` samples
    (see the module docstring), or why it could not be built or run (``"error"``)."""
    torch.manual_seed(0)
    try:
        model, data = CASES[name](batch_size)
        model = model.double().eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.1)
        data = [
            {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            if isinstance(batch, dict) else tuple(
                t.double() if t.is_floating_point() else t for t in batch
            )
            for batch in data
        ]
    except Exception as error:  # (a missing library, or settings this version rejects)
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    return _coverage.measure(model, data)


def _header(threads: int, batch_size: int) -> tuple[str, str, str]:
    from importlib import metadata

    versions = " · ".join(
        f"{package} {metadata.version(package)}"
        for package in ("peft", "transformers", "timm")
        if _installed(package)
    )
    return (
        "Engines of models with PEFT adapters: `exact`, `auto` against `loop`",
        f"{versions} · {threads} thread(s) · float64 · B={batch_size}",
        "case",
    )


def _installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> str | None:
    return _coverage.main(
        argv, __doc__, "benchmarks.peft_coverage", PACKAGES, measure_case,
        _header, RESULTS, sizes={"batch_size": (3, 1, "samples per batch")},
    )


if __name__ == "__main__":
    main()
