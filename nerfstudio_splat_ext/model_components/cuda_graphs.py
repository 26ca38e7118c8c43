"""Capturing CUDA graphs without the pitfalls met in training (shared by model_components/graphed_mlp.py and
losses/graphed.py)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch


def capture_autocast():
    """The caller's autocast state with the weight-cast cache off (graph capture cannot use the cache)."""
    if not torch.is_autocast_enabled("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


@contextmanager
def capturing(graph: "torch.cuda.CUDAGraph", pool, stream: "torch.cuda.Stream"):
    """Capture into ``graph`` on the side ``stream`` (a forward and its backward must share one: autograd runs a
    backward kernel on its forward's stream). Not ``torch.cuda.graph``: that one empties the allocator's cache at
    every capture, and the eager steps after it then pay for fresh device allocations."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            yield
        finally:
            graph.capture_end()
    current.wait_stream(stream)


def warmed_up_stream(run: Callable[[], object], device: torch.device) -> "torch.cuda.Stream":
    """A side stream on which ``run`` has run twice (library handles, workspaces) and that captures will use."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), capture_autocast():
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    return side
