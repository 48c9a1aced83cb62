"""Real architectures (torchvision's, in small configurations): the default engine's exact
Fisher equals the functorch engine's, and the hook engine covers them without falling back."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ewc_reg import fisher_diagonal

from .reference import assert_close_dicts

models = pytest.importorskip("torchvision.models")
convnext = pytest.importorskip("torchvision.models.convnext")
swin = pytest.importorskip("torchvision.models.swin_transformer")

ARCHITECTURES = {
    "resnet18": lambda: models.resnet18(num_classes=5),
    "mobilenet_v3_small": lambda: models.mobilenet_v3_small(num_classes=5),
    "shufflenet_v2": lambda: models.shufflenet_v2_x0_5(num_classes=5),
    "squeezenet": lambda: models.squeezenet1_1(num_classes=5),
    "densenet": lambda: models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=5
    ),
    # class token and position embedding: per-sample copies
    "vit": lambda: models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    ),
    # layer scale: per-sample copies
    "convnext": lambda: models.ConvNeXt(
        [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)], num_classes=5
    ),
    # indexed relative position tables: their attention modules become units
    "swin": lambda: swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=5,
    ),
    "maxvit": lambda: models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    ),
}


#: The modules that go to the per-module fallback, by class (the others have rules): the
#: attention modules with relative position tables (an indexed table, no rule).
WITHOUT_RULES = {
    "swin": ["ShiftedWindowAttention"] * 2,
}  # (maxvit's attention: on the fallback until its relative position tables took shadowed
# per-sample copies, .loose.SHADOWED)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_functorch(name: str, caplog) -> None:
    torch.manual_seed(0)
    model: nn.Module = ARCHITECTURES[name]().double().eval()
    with torch.no_grad():  # (zero-initialised heads would leave the rest of the Fisher zero)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    data = [(x, torch.randint(0, 5, (3,)))]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data)
    assert not [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    fallbacks = [r.args[1] for r in caplog.records if r.name == "ewc_reg.fallback"]
    assert fallbacks == WITHOUT_RULES.get(name, [])  # (ConvNeXt's LayerNorm2d has a rule)
    assert_close_dicts(got, fisher_diagonal(model, data, backend="functorch"), 1e-10)
