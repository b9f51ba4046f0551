"""Successive halving's arithmetic (DESIGN §9): where the rungs are and who goes on at one.
Pure Python, no torch: the API may import it."""

import math
from collections.abc import Sequence

# Metric values within this relative tolerance rank as equal (GRADSTREAM_RANK_RTOL's default).
DEFAULT_RANK_RTOL = 1e-5


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


def rank_by_loss(losses: Sequence[float | None], rtol: float = 0.0) -> list[int]:
    """Positions best first: lower loss first; a missing or non-finite loss ranks after every
    finite one. Losses within `rtol` of each other (relative) count as equal, and among equals
    the lower position goes first (DESIGN §11): sorted by loss, each run of losses within rtol
    of the run's lowest is one tie. Two machines whose losses agree to float32 rounding then
    rank alike, unless a loss straddles the edge of a run."""

    def finite(position: int) -> bool:
        loss = losses[position]
        return loss is not None and math.isfinite(loss)

    by_loss = sorted((p for p in range(len(losses)) if finite(p)), key=lambda p: (losses[p], p))
    ranked: list[int] = []
    tie: list[int] = []
    for position in by_loss:
        if tie and not close(losses[tie[0]], losses[position], rtol):
            ranked += sorted(tie)
            tie = []
        tie.append(position)
    ranked += sorted(tie)
    return ranked + [p for p in range(len(losses)) if not finite(p)]


def close(lowest: float | None, value: float | None, rtol: float) -> bool:
    """Whether `value` (>= `lowest`) is within `rtol` of `lowest`, relative to the larger."""
    assert lowest is not None and value is not None
    return value - lowest <= rtol * max(abs(lowest), abs(value))


def halving_cut(
    losses: Sequence[float | None], eta: int, rtol: float = 0.0
) -> tuple[list[int], float | None]:
    """Who goes on at a rung, ranked by `losses` (one per running member; equal within
    `rtol`): the best ceil(n / eta) positions, ascending, and the cut-off (the worst loss
    that goes on; None when nobody is cut, or the cut-off member's loss is not finite).
    Fewer than `eta` members: everyone goes on."""
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    n = len(losses)
    if n < eta:
        return list(range(n)), None
    ranked = rank_by_loss(losses, rtol)
    survivors = ranked[: math.ceil(n / eta)]
    cutoff = losses[survivors[-1]]
    if cutoff is not None and not math.isfinite(cutoff):
        cutoff = None
    return sorted(survivors), cutoff
