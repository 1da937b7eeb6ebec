"""Model factory: every architecture fedobj trains, built from one small dataclass.

``ModelArgs`` is stored in every checkpoint and sent with every message, so whoever
loads weights rebuilds exactly the network that produced them. Models start from
scratch (no pretrained ImageNet weights offline); ``pretrained_path`` loads weights
from a local file the project saved itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from fedobj.errors import ConfigError

MODEL_NAMES = ("cnn", "mobilenet_v3_small", "mobilenet_v3_large")
NORMS = ("batch", "group")
HEAD_PREFIX = {
    "cnn": "classifier.",
    "mobilenet_v3_small": "classifier.3.",
    "mobilenet_v3_large": "classifier.3.",
}


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a model: architecture, input and head size."""

    name: str = "cnn"
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    norm: str = "group"

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in-channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        min_size = 16 if self.name == "cnn" else 32
        if self.image_size < min_size:
            raise ConfigError(
                f"image-size must be >= {min_size} for {self.name}, "
                f"got {self.image_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def with_classes(self, n: int) -> ModelArgs:
        return replace(self, num_classes=n)


def _norm2d(kind: str, channels: int) -> nn.Module:
    # GroupNorm keeps per-sample statistics, which DP-SGD (Opacus) requires; 8 groups
    # is a common default that divides every width used here.
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.BatchNorm2d(channels)


class SmallCNN(nn.Module):
    """Two conv blocks (32 and 64 channels, 3x3) and one hidden layer of 128.

    Sized for hundreds of simulated clients on 2 cores: ~4 M multiply-adds per 28x28
    image, ~0.42 M parameters, yet >90% on Fashion-MNIST. The adaptive pool to 7x7
    makes it accept any input size >= 16 with the same parameter shapes.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                _norm2d(args.norm, cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(args.in_channels, 32), block(32, 64))
        self.pool = nn.AdaptiveAvgPool2d(7)  # identity at 28x28 (28 -> 14 -> 7)
        self.hidden = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
        )
        self.classifier = nn.Linear(128, args.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.hidden(self.pool(self.features(x))))
        return logits


def _mobilenet(args: ModelArgs) -> nn.Module:
    from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

    ctor = (
        mobilenet_v3_small if args.name == "mobilenet_v3_small" else mobilenet_v3_large
    )
    norm_layer = None
    if args.norm == "group":

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(min(8, c), c)

    model = ctor(weights=None, num_classes=args.num_classes, norm_layer=norm_layer)
    if args.in_channels != 3:
        stem = model.features[0]
        assert isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d)
        first = stem[0]
        stem[0] = nn.Conv2d(
            args.in_channels,
            first.out_channels,
            first.kernel_size,  # type: ignore[arg-type]
            first.stride,  # type: ignore[arg-type]
            first.padding,  # type: ignore[arg-type]
            bias=False,
        )
    return cast(nn.Module, model)


def build_model(args: ModelArgs, pretrained_path: str | None = None) -> nn.Module:
    """Build a fresh model; optionally load weights from a local checkpoint file.

    Weights whose shape does not match (e.g. a head with another number of classes)
    are left at their fresh initialisation and reported, so a checkpoint trained on
    other categories is still a useful starting point.
    """
    model = SmallCNN(args) if args.name == "cnn" else _mobilenet(args)
    if pretrained_path:
        from fedobj.model.checkpoint import load_state_dict_file

        state = load_state_dict_file(pretrained_path)
        own = model.state_dict()
        usable = {
            k: v for k, v in state.items() if k in own and own[k].shape == v.shape
        }
        if not usable:
            raise ConfigError(
                f"pretrained-path {pretrained_path}: no tensor matches {args.name}"
            )
        model.load_state_dict(usable, strict=False)
    return model


def head_keys(args: ModelArgs) -> tuple[str, str]:
    """State-dict keys of the classifier weights and bias (head growth needs them)."""
    prefix = HEAD_PREFIX[args.name]
    return prefix + "weight", prefix + "bias"
