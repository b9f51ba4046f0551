"""Successive halving's arithmetic (DESIGN §9): where the rungs are and who goes on at one.
Pure Python, no torch: the API may import it."""

import math
from collections.abc import Sequence


def halving_rungs(min_steps: int, eta: int, steps: int) -> list[int]:
    """The rungs: min_steps * eta^k for k = 0, 1, ... while below `steps`."""
    if min_steps < 1 or eta < 2:
        raise ValueError(f"halving needs min_steps >= 1 and eta >= 2, not {min_steps} and {eta}")
    rungs = []
    rung = min_steps
    while rung < steps:
        rungs.append(rung)
        rung *= eta
    return rungs


def rank_by_loss(losses: Sequence[float | None]) -> list[int]:
    """Positions best first: lower loss first, ties by position; a missing or non-finite
    loss ranks after every finite one."""

    def key(position: int) -> tuple[int, float, int]:
        loss = losses[position]
        if loss is None or not math.isfinite(loss):
            return (1, 0.0, position)
        return (0, loss, position)

    return sorted(range(len(losses)), key=key)


def halving_cut(losses: Sequence[float | None], eta: int) -> tuple[list[int], float | None]:
    """Who goes on at a rung, ranked by `losses` (one per running member): the best
    ceil(n / eta) positions, ascending, and the cut-off (the worst loss that goes on; None
    when nobody is cut, or the cut-off member's loss is not finite). Fewer than `eta`
    members: everyone goes on."""
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    n = len(losses)
    if n < eta:
        return list(range(n)), None
    ranked = rank_by_loss(losses)
    survivors = ranked[: math.ceil(n / eta)]
    cutoff = losses[survivors[-1]]
    if cutoff is not None and not math.isfinite(cutoff):
        cutoff = None
    return sorted(survivors), cutoff
