"""Background colour shared by the splat-ext models."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

VIEWER_BACKGROUND = (0.1490, 0.1647, 0.2157)  # nerfstudio viewer's background, shown outside training for "random"


def dataset_background(metadata: Optional[Mapping[str, Any]]) -> Any:
    """The colour the dataparser composited RGBA images on (metadata['background_color']), or None for
    photographs."""
    return (metadata or {}).get("background_color")


def resolve_background(choice: str, metadata: Optional[Mapping[str, Any]]) -> torch.Tensor:
    """'auto': the dataset's alpha colour (the dataparser's metadata['background_color']; white for Blender data),
    else black. 'white' / 'black' as named; 'random' gives the viewer's colour (random colours are drawn per step
    during training by the model itself)."""
    if choice == "auto":
        colour = dataset_background(metadata)
        return torch.as_tensor(colour, dtype=torch.float32).clone() if colour is not None else torch.zeros(3)
    if choice == "random":
        return torch.tensor(VIEWER_BACKGROUND)
    return torch.ones(3) if choice == "white" else torch.zeros(3)
