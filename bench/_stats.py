"""What the benchmarks share."""


def pct(xs: list[float], p: float) -> float:
    """The ``p``th percentile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
