"""Datasets of the Split MNIST / Split CIFAR-10 benchmarks, loaded whole as tensors.

Every loader returns an :class:`ArrayData`: the full train and test sets as float inputs and
int64 labels (0-9), so the training loop can index random batches directly instead of going
through a ``DataLoader``. Real data come from torchvision (downloaded into ``root`` when missing;
:class:`DataUnavailable` when that fails); :func:`synthetic` makes learnable stand-ins of the same
shapes for smoke runs and tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: Per-channel statistics used to normalise CIFAR-10 inputs (as in the paper's code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

MNIST_SHAPE = (1, 28, 28)
CIFAR10_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class ArrayData:
    """A classification dataset held as tensors: inputs ``(N, *shape)``, labels ``(N,)``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def to(self, device: torch.device | str) -> ArrayData:
        """The same data on ``device``."""
        return ArrayData(*(t.to(device) for t in (self.train_x, self.train_y,
                                                   self.test_x, self.test_y)))


def default_root() -> str:
    """Data directory: ``$EWC_REG_DATA`` when set (and not empty), else ``./data``."""
    return os.environ.get("EWC_REG_DATA") or "./data"


class DataUnavailable(RuntimeError):
    """A real dataset is not in its data directory and could not be downloaded (no internet)."""


def _torchvision_split(
    dataset: type,
    name: str,
    root: str,
    folder: Path,
    files: Sequence[str],
    urls: Sequence[str],
    train: bool,
) -> Any:
    """``dataset(root, train=train, download=True)``: torchvision downloads what is missing
    of ``files`` from ``urls`` into ``folder`` under ``root``.

    When that fails the directories the attempt made are removed again (those left empty), and
    :class:`DataUnavailable` says where the data was expected, which files are missing there
    and where they come from, in one line instead of torchvision's traceback of the failed
    download (whose message names the first file it tried, which may be one that is there).
    """
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        return dataset(root, train=train, download=True)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        for path in made:
            with suppress(OSError):  # not empty: a partial download stays for a retry
                path.rmdir()
        reason = " ".join(str(err).split())
        missing = [file for file in files if not (folder / file).exists()]
        raise DataUnavailable(
            f"{name} is not (complete) in {folder} (torchvision's folder under the data root "
            f"{root}; missing: {', '.join(missing) or 'none, but a file is damaged'}) and "
            f"could not be downloaded from {' or '.join(urls)}: {reason}"
        ) from err


def load_mnist(root: str) -> ArrayData:
    """MNIST with pixels scaled to [0, 1] and no normalisation; downloads when missing."""
    from torchvision.datasets import MNIST

    folder = Path(root).expanduser() / MNIST.__name__ / "raw"  # (torchvision's MNIST.raw_folder)

    files = [Path(url).name.removesuffix(".gz") for url, _ in MNIST.resources]

    def split(train: bool) -> tuple[Tensor, Tensor]:
        ds = _torchvision_split(MNIST, "MNIST", root, folder, files, MNIST.mirrors, train)
        return ds.data.float().div_(255).unsqueeze(1), ds.targets.long()

    return ArrayData(*split(True), *split(False))


def load_cifar10(root: str) -> ArrayData:
    """CIFAR-10 scaled to [0, 1] then normalised per channel; downloads when missing."""
    from torchvision.datasets import CIFAR10

    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    folder = Path(root).expanduser() / CIFAR10.base_folder

    files = [file for file, _ in CIFAR10.train_list + CIFAR10.test_list]
    files.append(CIFAR10.meta["filename"])

    def split(train: bool) -> tuple[Tensor, Tensor]:
        ds = _torchvision_split(CIFAR10, "CIFAR-10", root, folder, files, [CIFAR10.url], train)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255)
        return (x - mean) / std, torch.tensor(ds.targets, dtype=torch.long)

    return ArrayData(*split(True), *split(False))


def synthetic(
    shape: tuple[int, ...],
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
    num_classes: int = 10,
    noise: float = 0.5,
) -> ArrayData:
    """Learnable synthetic data: a random prototype in [0, 1] per class plus Gaussian noise.

    Only for smoke runs and tests; its accuracies mean nothing about the paper's benchmarks.
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=gen)

    def split(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = prototypes[y] + noise * torch.randn((len(y), *shape), generator=gen)
        return x, y

    return ArrayData(*split(train_per_class), *split(test_per_class))
