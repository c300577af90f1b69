"""What the worker's and the server's Prometheus metrics share."""

from __future__ import annotations

from typing import Callable


def nan_on_error(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge's reader that gives NaN instead of failing the scrape (not loaded yet, Redis down)."""

    def safe() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - a scrape must not fail on one value
            return float("nan")

    return safe
