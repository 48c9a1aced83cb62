"""The README's Python examples run as written, in order, on small synthetic data standing in for
the names they leave to the reader (``task_loaders``, ``loader``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _batches(classes: tuple[int, int], count: int = 2, size: int = 8) -> list:
    labels = torch.tensor(classes)
    return [
        (torch.rand(size, 1, 28, 28), labels[torch.randint(0, 2, (size,))]) for _ in range(count)
    ]


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "the README's examples changed: update this test"
    names = {"task_loaders": [_batches((0, 1)), _batches((2, 3))], "loader": _batches((2, 3))}
    for block in blocks:
        exec(compile(block, str(README), "exec"), names)
    reg, model, fisher = names["reg"], names["model"], names["fisher"]
    assert reg.num_tasks == 2 and reg.penalty().item() >= 0
    assert list(fisher) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(f.shape == p.shape for f, p in zip(fisher.values(), model.parameters()))
