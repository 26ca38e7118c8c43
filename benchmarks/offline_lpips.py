"""Lets nerfstudio's own splatfacto run on an offline machine.

splatfacto builds torchmetrics' LPIPS in its constructor, which downloads AlexNet weights and fails without
internet. LPIPS plays no part in training, so when it cannot be built we replace the class with one that returns
NaN; the benchmark computes its own metrics (LPIPS only where the weights load) for every method alike.
"""

import math


def patch_offline_lpips() -> bool:
    """Returns True when LPIPS was unavailable and the stand-in was installed."""
    import torch
    import torchmetrics.image
    import torchmetrics.image.lpip as lpip

    try:
        lpip.LearnedPerceptualImagePatchSimilarity(normalize=True)
        return False
    except Exception:
        pass

    class UnavailableLPIPS(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def forward(self, *args, **kwargs):
            return torch.tensor(math.nan)

    lpip.LearnedPerceptualImagePatchSimilarity = UnavailableLPIPS
    torchmetrics.image.LearnedPerceptualImagePatchSimilarity = UnavailableLPIPS
    return True
