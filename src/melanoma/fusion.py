"""Image + metadata models (``model.fusion=concat``): one head on a backbone's pooled features and the metadata.

As in the SIIM-ISIC 2020 first place: the timm backbone's pooled features (its classifier removed,
``num_classes=0``) are concatenated with a small MLP of the encoded metadata
(:mod:`melanoma.metadata`), and one linear head is trained on both. Any timm backbone works; the
layer-wise learning-rate decay of the backbone is kept, and the metadata branch and the head learn
at the full rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.models import group_parameters
from torch import nn

FUSIONS = ("none", "concat")


class FusionNet(nn.Module):
    """``head(concat(backbone(images), mlp(metadata)))``, one logit.

    Args:
        backbone: a timm model; its classifier is removed so that it returns pooled features
            (timm applies its ``drop_rate`` dropout to them).
        n_metadata: width of the encoded metadata (:attr:`melanoma.metadata.MetadataEncoder.width`).
        hidden: width of the metadata branch.
        drop_rate: dropout of the metadata branch.
    """

    def __init__(self, backbone: nn.Module, n_metadata: int, hidden: int = 32, drop_rate: float = 0.2) -> None:
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.meta = nn.Sequential(nn.Linear(n_metadata, hidden), nn.BatchNorm1d(hidden), nn.SiLU(),
                                  nn.Dropout(drop_rate))
        self.head = nn.Linear(backbone.num_features + hidden, 1)
        with torch.no_grad():  # p = 0.5 at the start, as the image-only models (models.zero_head)
            self.head.weight.zero_()
            self.head.bias.zero_()
        self.pretrained_cfg = backbone.pretrained_cfg  # the backbone's preprocessing (timm's data config)
        self.num_classes = 1

    def forward(self, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, 1)``."""
        return self.head(torch.cat([self.backbone(images), self.meta(metadata)], dim=1))

    def get_classifier(self) -> nn.Module:
        """The fused head (what ``models.zero_head`` zeroes)."""
        return self.head

    def group_matcher(self, coarse: bool = False) -> Callable[[str], float]:
        """timm's layer groups of the backbone; the metadata branch and the head are the top group."""
        layer = group_parameters(self.backbone, self.backbone.group_matcher(coarse), reverse=True)
        return lambda name: layer.get(name.removeprefix("backbone."), math.inf) if name.startswith("backbone.") \
            else math.inf

    def no_weight_decay(self) -> set[str]:
        """The backbone's own exclusions (position embeddings and the like)."""
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in inner}


def fuse(backbone: nn.Module, fusion: str, n_metadata: int) -> nn.Module:
    """The model for ``model.fusion``: the backbone itself for ``none``, a :class:`FusionNet` for ``concat``."""
    if fusion == "none" or n_metadata == 0:
        return backbone
    return FusionNet(backbone, n_metadata)
