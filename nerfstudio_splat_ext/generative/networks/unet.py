"""A convolutional U-Net (after the DDPM / Splatter Image U-Nets), optionally conditioned on a diffusion timestep.

Levels ``i = 0 .. L-1`` run at resolution ``H / 2**i`` with ``base_width * channel_mults[i]`` channels; each holds
``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convolutions) and, for ``i in attention_levels``, a
self-attention block (the decoder's: ``decoder_attention_levels``, by default the same). The decoder mirrors the
encoder and concatenates the encoder's features of the same level. With ``time_embedding=True`` a sinusoidal
embedding of the (float) timestep goes through a small MLP and shifts / scales the features of every residual block
(FiLM).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _groups(channels: int) -> int:
    """Groups of a GroupNorm: up to 32, at least 4 channels each (tiny CPU widths included)."""
    g = 32
    while g > 1 and (channels % g != 0 or channels // g < 4):
        g //= 2
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of float timesteps ``t [B]`` (Vaswani et al. 2017 frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: Optional[int]) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch) if emb_dim is not None else None
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor]) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # [B, HW, C] each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``forward(x [B, Cin, H, W], t [B] or None) -> [B, Cout, H, W]``; H and W divisible by
    ``2 ** (len(channel_mults) - 1)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_width: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (),
        time_embedding: bool = False,
        decoder_attention_levels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if len(channel_mults) < 1 or num_res_blocks < 1 or base_width < 1:
            raise ValueError("UNet needs at least one level, one residual block per level and base_width >= 1")
        levels = len(channel_mults)
        decoder_attention_levels = attention_levels if decoder_attention_levels is None else decoder_attention_levels
        bad = [a for a in (*attention_levels, *decoder_attention_levels) if not 0 <= a < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {levels} levels 0..{levels - 1}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channel_mults = tuple(channel_mults)
        self.time_embedding = time_embedding
        emb_dim = 4 * base_width if time_embedding else None
        if time_embedding:
            self.time_mlp = nn.Sequential(
                nn.Linear(base_width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)  # type: ignore[arg-type]
            )
        self.base_width = base_width
        widths = [base_width * m for m in channel_mults]
        self.in_conv = nn.Conv2d(in_channels, base_width, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = base_width
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, w, emb_dim))
                ch = w
            self.down_blocks.append(nn.ModuleList(blocks))
            self.down_attn.append(AttentionBlock(w) if i in attention_levels else nn.Identity())
            self.downsamples.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < levels - 1 else nn.Identity())

        self.mid1 = ResBlock(ch, ch, emb_dim)
        self.mid_attn = AttentionBlock(ch) if (levels - 1) in attention_levels else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim)

        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(levels)):
            w = widths[i]
            blocks = [ResBlock(ch + w, w, emb_dim)]  # concatenated skip of this level
            for _ in range(num_res_blocks - 1):
                blocks.append(ResBlock(w, w, emb_dim))
            ch = w
            self.up_blocks.append(nn.ModuleList(blocks))
            self.up_attn.append(AttentionBlock(w) if i in decoder_attention_levels else nn.Identity())
            self.upsamples.append(nn.Conv2d(w, w, 3, padding=1) if i > 0 else nn.Identity())

        self.out_norm = _norm(ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def forward(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"UNet input H, W must be divisible by {m}, got {tuple(x.shape[-2:])}")
        emb = None
        if self.time_embedding:
            if t is None:
                raise ValueError("this UNet has time_embedding=True: pass timesteps t [B]")
            t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"{t.shape[0]} timesteps for a batch of {x.shape[0]}")
            emb = self.time_mlp(timestep_embedding(t.to(x.device), self.base_width).to(x.dtype))
        elif t is not None:
            raise ValueError("this UNet has time_embedding=False: it takes no timesteps")

        h = self.in_conv(x)
        skips: List[Tensor] = []
        for blocks, attn, down in zip(self.down_blocks, self.down_attn, self.downsamples):
            for block in blocks:
                h = block(h, emb)
            h = attn(h)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, attn, up in zip(self.up_blocks, self.up_attn, self.upsamples):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = attn(h)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))
