"""The noise-level classifier F(x) -> T+2 logits, on MONAI's DiffusionModelUNet backbone (whole, or its encoder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

from ..errors import UsageError

ARCHS = ("unet", "encoder")


class CDMClassifier(nn.Module):
    """F(x): a time-free UNet ending in a conv, then SiLU -> global average pool -> Linear(T+2) -> cumulative sum.

    The backbone is MONAI's `DiffusionModelUNet` (2D or 3D) fed a constant timestep, so the network never
    sees t: the noise level is what it predicts. Plain attention (no flash/fused kernels) keeps the double
    backward of Algorithm 1 available. The fixed cumulative sum F_k = sum_{j<=k} h_j over the raw head
    output h makes F_t(x) = log p_t(x) + c(x) at the optimum. With `num_classes`, the model is
    class-conditional through MONAI's class embedding, with one extra trained null label
    (`null_label == num_classes`) used when `labels` is None and for classifier-free guidance.

    `arch="encoder"` keeps only the UNet's down path and middle block (the paper's encoder-only classifier,
    Section 6): the logits need an image-to-vector map, so the decoder is dropped from every forward pass,
    input gradient and double backward; its output conv becomes a GroupNorm over the last level's channels.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        T: int,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_classes: Optional[int] = None,
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 32,
        arch: str = "unet",
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise UsageError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
        self.T = T
        self.num_classes = num_classes
        self.arch = arch
        width = channels[0] if arch == "unet" else channels[-1]
        self.backbone = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=channels[0],
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=None if num_classes is None else num_classes + 1,
            use_flash_attention=False,
        )
        if arch == "encoder":
            self.backbone.up_blocks = nn.ModuleList()
            self.backbone.out = nn.GroupNorm(norm_num_groups, width, eps=1e-6)
        # The UNet's own output conv is the head's conv (a second full-resolution conv costs ~5% of a training
        # step for nothing). MONAI zero-initialises it, right for a denoiser; a classifier needs signal from step 0.
        for module in self.backbone.out.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.reset_parameters()
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.head = nn.Sequential(nn.SiLU(), pool(1), nn.Flatten(), nn.Linear(width, T + 2))

    @property
    def null_label(self) -> int:
        """Index of the trained 'no label' class of a class-conditional model."""
        if self.num_classes is None:
            raise ValueError("this CDMClassifier is unconditional; it has no null label")
        return self.num_classes

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Logits F(x) (or F(x | labels)) of shape (B, T+2) over noise levels t = 0..T+1."""
        batch = x.shape[0]
        constant_t = torch.zeros(batch, dtype=torch.long, device=x.device)
        class_labels = None
        if self.num_classes is not None:
            class_labels = labels if labels is not None else torch.full_like(constant_t, self.null_label)
        elif labels is not None:
            raise ValueError("labels given to an unconditional CDMClassifier")
        features = self.backbone(x, constant_t, class_labels=class_labels)
        with torch.autocast(x.device.type, enabled=False):  # the head and its sum over 1000 levels stay float32
            h = self.head(features.to(torch.promote_types(features.dtype, torch.float32)))
        return torch.cumsum(h, dim=1)
