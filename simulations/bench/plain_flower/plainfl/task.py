"""plainfl: model, data, train and test, written the way quickstart-pytorch does.

No Flower imports here (quickstart's ``task.py`` has none either). What is *not*
quickstart's is what makes the comparison with fedobj fair:

* the model is fedobj's SmallCNN (``build_model`` with the same ``ModelArgs``);
* the partitions are fedobj's: the same Dirichlet partitioner, seed and per-node
  held-out split (``train_eval_split`` with ``seed + 7919 * partition_id``), so each
  node trains on exactly the images it trains on in fedobj;
* Fashion-MNIST comes from the local IDX files (Hugging Face cannot be reached), read
  once per process into a module-level cache: the equivalent of quickstart caching
  its ``FederatedDataset`` in the global ``fds``;
* SGD has fedobj's weight decay and the learning rate the server sends each round.

What *is* quickstart's: a ``DataLoader`` over a map-style dataset whose samples go
through ``ToTensor() + Normalize((0.5,), (0.5,))`` one by one, ``num_workers=0``.
That per-sample path is exactly what fedobj replaces with batched tensor indexing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import Compose, Normalize, ToTensor

from fedobj.data.categories import FASHION_MNIST_SLUGS
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.data.partition import dirichlet, train_eval_split
from fedobj.model.factory import ModelArgs, build_model

# fedobj's run builds ModelArgs("cnn", 10 classes, 1 channel, 28 px, "group")
MODEL_ARGS = ModelArgs(name="cnn", num_classes=10, in_channels=1, image_size=28)

# ToTensor: HxW uint8 -> 1xHxW float in [0, 1]; Normalize: -> [-1, 1], which is
# fedobj's (x / 255 - 0.5) / 0.5
pytorch_transforms = Compose([ToTensor(), Normalize((0.5,), (0.5,))])

# Module-level caches, one per process (a Ray actor serves many virtual nodes):
# quickstart keeps its FederatedDataset in a global for the same reason.
_splits: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_partitions: dict[tuple[int, float, int, str], list[np.ndarray]] = {}


def Net() -> nn.Module:  # noqa: N802 - quickstart's name for its model
    """fedobj's SmallCNN, freshly initialised (seed the global RNG to repeat it)."""
    model: nn.Module = build_model(MODEL_ARGS)
    return model


def _fashion_mnist(split: str, dataset_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels, read from the IDX files once."""
    key = (split, dataset_dir)
    if key not in _splits:
        data = load_fashion_mnist(split, dataset_dir or None)
        # a writable copy: ToTensor warns on the read-only buffer the file gave
        _splits[key] = (data.images[:, 0].copy(), data.labels)
    return _splits[key]


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Map-style dataset: one transformed image per ``__getitem__``, as HF gives."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[np.ndarray], torch.Tensor],
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


@dataclass(frozen=True)
class DataSpec:
    """Which partition a node holds; the same knobs as fedobj's run config."""

    partition_id: int
    num_partitions: int
    alpha: float = 0.5
    seed: int = 42
    eval_fraction: float = 0.1
    dataset_dir: str = ""


def load_data(
    spec: DataSpec, batch_size: int, shuffle_seed: int
) -> tuple[DataLoader[tuple[torch.Tensor, int]], DataLoader[tuple[torch.Tensor, int]]]:
    """This node's train and held-out loaders (fedobj's partition and split).

    ``shuffle_seed`` seeds the train loader's sampler; ``RandomSampler`` then draws
    ``torch.randperm(n, generator)``, the same call fedobj's loop makes, so with the
    same seed both visit a node's images in the same order.
    """
    images, labels = _fashion_mnist("train", spec.dataset_dir)
    key = (spec.num_partitions, spec.alpha, spec.seed, spec.dataset_dir)
    if key not in _partitions:
        _partitions[key] = dirichlet(labels, spec.num_partitions, spec.alpha, spec.seed)
    mine = _partitions[key][spec.partition_id]
    tr, ev = train_eval_split(
        len(mine), spec.eval_fraction, spec.seed + 7919 * spec.partition_id
    )
    train_idx, eval_idx = mine[tr], mine[ev]
    trainset = ImageDataset(images[train_idx], labels[train_idx], pytorch_transforms)
    evalset = ImageDataset(images[eval_idx], labels[eval_idx], pytorch_transforms)
    gen = torch.Generator().manual_seed(shuffle_seed)
    trainloader = DataLoader(
        trainset, batch_size=batch_size, shuffle=True, generator=gen
    )
    return trainloader, DataLoader(evalset, batch_size=batch_size)


def load_folder_data(
    data_dir: str, batch_size: int, shuffle_seed: int, eval_fraction: float, seed: int
) -> tuple[DataLoader[tuple[torch.Tensor, int]], DataLoader[tuple[torch.Tensor, int]]]:
    """A real device's loaders: torchvision's ``ImageFolder`` over ``data-dir``.

    What a plain Flower app on a SuperNode does: decode the node's image folder
    (``<dir>/<category-slug>/*.png``) in the ClientApp process, which Flower
    starts afresh for every message, so every message decodes it again. Labels
    follow Fashion-MNIST's order (the slugs of fedobj's catalog), so the
    centralised test accuracy means what it means in fedobj; the held-out split
    is fedobj's (``train_eval_split`` with ``seed`` over the sorted files).
    """
    folder = ImageFolder(data_dir)  # sorted classes, sorted files: fedobj's order
    order = {slug: i for i, slug in enumerate(FASHION_MNIST_SLUGS)}
    images = np.stack(
        [
            np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
            for path, _ in folder.samples
        ]
    )
    labels = np.array(
        [order[folder.classes[c]] for _, c in folder.samples], dtype=np.int64
    )
    tr, ev = train_eval_split(len(labels), eval_fraction, seed)
    trainset = ImageDataset(images[tr], labels[tr], pytorch_transforms)
    evalset = ImageDataset(images[ev], labels[ev], pytorch_transforms)
    gen = torch.Generator().manual_seed(shuffle_seed)
    trainloader = DataLoader(
        trainset, batch_size=batch_size, shuffle=True, generator=gen
    )
    return trainloader, DataLoader(evalset, batch_size=batch_size)


def load_centralized_dataset(dataset_dir: str) -> DataLoader[tuple[torch.Tensor, int]]:
    """The 10,000 test images (cached arrays, per-sample transforms, batch 128)."""
    images, labels = _fashion_mnist("test", dataset_dir)
    return DataLoader(ImageDataset(images, labels, pytorch_transforms), batch_size=128)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    seconds: float


def train(
    net: nn.Module,
    trainloader: DataLoader[tuple[torch.Tensor, int]],
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> TrainResult:
    """SGD with momentum and weight decay; mean loss over the batches seen."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    net.train()
    t0 = time.perf_counter()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg = running_loss / max(epochs * len(trainloader), 1)
    return TrainResult(avg, time.perf_counter() - t0)


def test(
    net: nn.Module, testloader: DataLoader[tuple[torch.Tensor, int]]
) -> tuple[float, float]:
    """Mean loss per sample and accuracy (fedobj reports both per sample)."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += int((outputs.argmax(1) == labels).sum())
            n += len(labels)
    return loss / max(n, 1), correct / max(n, 1)
