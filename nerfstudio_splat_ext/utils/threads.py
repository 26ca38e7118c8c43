"""Run an I/O-bound function over many items in a thread pool (image decoding: PIL and numpy release the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, List, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], max_workers: int = 8) -> List[R]:
    """[fn(item) for item in items], computed by up to `max_workers` threads (at most one per CPU). Results keep the
    items' order; the first item (in order) whose call raised re-raises its exception here."""
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))
