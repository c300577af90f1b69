"""`ordered_map`: a function over items in a few threads, results in the items' order.

Reading, hashing and numpy/torch products release the GIL, so loading and verifying a memory read
its delta files this way: each file is fetched, checked and multiplied out while the caller adds
the ones before it, in order (the sums stay those of one thread, bit for bit). At most
2 × workers results wait at any time, so memory stays bounded however many files there are.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREADS = min(4, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """fn(item) for each item, in order, computed by `workers` threads (default THREADS). An
    exception raised by fn is raised here, at its item."""
    workers = THREADS if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="memoir-read") as pool:
        waiting: deque[Future] = deque()
        try:
            for item in items:
                waiting.append(pool.submit(fn, item))
                if len(waiting) >= 2 * workers:
                    yield waiting.popleft().result()
            while waiting:
                yield waiting.popleft().result()
        finally:
            for future in waiting:  # stopped early (an error, or the caller stopped reading)
                future.cancel()


__all__ = ["THREADS", "ordered_map"]
