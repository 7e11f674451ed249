"""The two networks, from MONAI, behind one factory and one output convention.

Every model returns lesion logits of shape (B, 1, H, W) for an input (B, 3, H, W) with H and W
multiples of 16. U-Net++ with deep supervision returns the list of its nested decoder outputs while
training (the loss averages them) and only the last, finest one otherwise.
"""

from __future__ import annotations

import contextlib

import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus
from torch import nn

from brainmets.config import ModelConfig

DIVISOR = 16  # four 2x poolings in both networks


class UNetPlusPlus(nn.Module):
    """MONAI's BasicUNetPlusPlus (Zhou et al., 2018), 2-D, returning a tensor rather than a list."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.widths) != 6:
            raise ValueError(f"unetpp needs 6 widths (5 levels and the decoder head), got {cfg.widths}")
        self.deep_supervision = cfg.deep_supervision
        self.net = BasicUNetPlusPlus(spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                     features=cfg.widths, deep_supervision=cfg.deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.net(x)
        if self.deep_supervision and self.training:
            return outputs
        return outputs[-1]


def build_attention_unet(cfg: ModelConfig) -> nn.Module:
    """MONAI's AttentionUnet (Oktay et al., 2018), 2-D, stride 2 between levels."""
    if len(cfg.widths) < 2:
        raise ValueError(f"attention-unet needs at least 2 widths, got {cfg.widths}")
    return AttentionUnet(spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                         channels=cfg.widths, strides=(2,) * (len(cfg.widths) - 1))


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name == "unetpp":
        return UNetPlusPlus(cfg)
    if cfg.name == "attention-unet":
        return build_attention_unet(cfg)
    raise ValueError(f"unknown model {cfg.name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_input(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[-1] % DIVISOR or x.shape[-2] % DIVISOR:
        raise ValueError(f"expected input (B, C, H, W) with H and W multiples of {DIVISOR}, got {tuple(x.shape)}; "
                         f"resize or pad the image")


def autocast(bf16: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast where asked (avx512_bf16 CPUs and GPUs run it ~2x faster), else nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
