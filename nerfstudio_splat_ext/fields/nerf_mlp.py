"""The NeRF network of Mildenhall et al. 2020: positional encoding and the 8x256 MLP with a skip connection.

Follows the authors' reference code where the paper is silent: the encoding keeps the raw input next to the sines
and cosines and uses frequencies 2^0 .. 2^(L-1) without a factor pi; the density is read from the trunk before the
view direction enters; the colour head is 256 -> (256 + dir encoding) -> 128 -> 3 with a sigmoid.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """gamma(p) = (p, sin(2^0 p), cos(2^0 p), ..., sin(2^(L-1) p), cos(2^(L-1) p)), per coordinate."""

    def __init__(self, in_dim: int, num_frequencies: int, include_input: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_frequencies = num_frequencies
        self.include_input = include_input
        self.register_buffer("freqs", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.in_dim * (2 * self.num_frequencies + int(self.include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x[..., None, :] * self.freqs[:, None]  # [..., L, D]
        enc = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).flatten(-2)  # [..., L*2D]
        return torch.cat([x, enc], dim=-1) if self.include_input else enc


class NeRFMLP(nn.Module):
    """sigma(x), c(x, d). ``depth`` trunk layers of ``width``; the encoded input is concatenated again to the input
    of trunk layer ``skip`` (0-based; 4 = the fifth layer, as in the paper)."""

    def __init__(
        self,
        pos_frequencies: int = 10,
        dir_frequencies: int = 4,
        depth: int = 8,
        width: int = 256,
        skip: int = 4,
        color_width: int = 128,
        density_activation: str = "relu",
    ) -> None:
        super().__init__()
        if density_activation not in ("relu", "softplus"):
            raise ValueError(f"density_activation must be 'relu' or 'softplus', got {density_activation!r}")
        self.density_activation = density_activation
        self.pos_enc = PositionalEncoding(3, pos_frequencies)
        self.dir_enc = PositionalEncoding(3, dir_frequencies)
        self.skip = skip
        layers = []
        in_dim = self.pos_enc.out_dim
        for i in range(depth):
            if i == skip and i > 0:
                in_dim += self.pos_enc.out_dim
            layers.append(nn.Linear(in_dim, width))
            in_dim = width
        self.trunk = nn.ModuleList(layers)
        self.density_head = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        self.color_hidden = nn.Linear(width + self.dir_enc.out_dim, color_width)
        self.color_out = nn.Linear(color_width, 3)

    def _trunk(self, positions: torch.Tensor) -> torch.Tensor:
        enc = self.pos_enc(positions)
        h = enc
        for i, layer in enumerate(self.trunk):
            if i == self.skip and i > 0:
                h = torch.cat([enc, h], dim=-1)
            h = torch.relu(layer(h))
        return h

    def _activate_density(self, raw: torch.Tensor) -> torch.Tensor:
        # 'relu' is the paper's. 'softplus' (shifted by -1, as Mip-NeRF) keeps a gradient where the density is
        # near zero, so a run cannot lose all density early and never recover (a dead ReLU everywhere).
        if self.density_activation == "softplus":
            return torch.nn.functional.softplus(raw - 1.0)
        return torch.relu(raw)

    def density(self, positions: torch.Tensor) -> torch.Tensor:
        """Volume density [..., 1]."""
        return self._activate_density(self.density_head(self._trunk(positions)))

    def forward(self, positions: torch.Tensor, directions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions, directions (unit): [..., 3] -> density [..., 1], rgb [..., 3]."""
        h = self._trunk(positions)
        sigma = self._activate_density(self.density_head(h))
        h = torch.cat([self.feature(h), self.dir_enc(directions)], dim=-1)
        rgb = torch.sigmoid(self.color_out(torch.relu(self.color_hidden(h))))
        return sigma, rgb
