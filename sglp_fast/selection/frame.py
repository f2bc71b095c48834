"""The frame every selector works in: segments keep a block, protected blocks stay, the budget is split.

Budget split (stated once, tested exhaustively in tests/test_plan.py): N blocks are split over the segments
in proportion to their sizes by largest remainders (Hamilton): segment i gets floor(N*size_i/L), then the
leftover blocks go one each to the largest fractional remainders (ties: lower segment index). A segment never
gets more than its capacity: its unprotected blocks, minus one unless ``allow_empty_segments`` (a segment is
never emptied otherwise). What a full segment cannot take is split again over the others by the same rule. A
budget larger than the total capacity is an error. Inside a segment a ranking removes its lowest-scoring
blocks (ties: lower index first). ``protect_first=m`` / ``protect_last=m`` keep the first/last m blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..checks import check_int


def protected_blocks(num_blocks: int, protect_first: int = 0, protect_last: int = 0) -> set[int]:
    """The first ``protect_first`` and last ``protect_last`` blocks, which no selector may remove."""
    check_int("protect_first", protect_first, 0)
    check_int("protect_last", protect_last, 0)
    return set(range(min(protect_first, num_blocks))) | set(range(max(num_blocks - protect_last, 0), num_blocks))


def check_segments(segments: Sequence[Sequence[int]], num_blocks: int | None = None) -> list[tuple[int, int]]:
    segs = [tuple(int(x) for x in s) for s in segments]
    if not segs or any(len(s) != 2 for s in segs):
        raise ValueError(f"segments: expected a non-empty list of [first, last] pairs, got {segments!r}")
    expected_first = 0
    for a, b in segs:
        if a != expected_first or b < a:
            raise ValueError(f"segments: expected contiguous inclusive ranges covering 0..L-1 in order, got "
                             f"{segs}; segment [{a}, {b}] should start at {expected_first}")
        expected_first = b + 1
    if num_blocks is not None and expected_first != num_blocks:
        raise ValueError(f"segments: cover blocks 0..{expected_first - 1}, but the model has {num_blocks}")
    return segs  # type: ignore[return-value]


def split_budget(segments: Sequence[Sequence[int]], remove: int, *, protected: set[int] | frozenset = frozenset(),
                 allow_empty_segments: bool = False) -> list[int]:
    """Blocks to remove per segment: proportional to segment size, largest remainders, capped by capacity."""
    segs = check_segments(segments)
    sizes = [b - a + 1 for a, b in segs]
    caps = []
    for (a, b), size in zip(segs, sizes):
        free = sum(1 for i in range(a, b + 1) if i not in protected)
        caps.append(min(free, size if allow_empty_segments else size - 1))
    if remove > sum(caps):
        raise ValueError(
            f"remove: {remove} blocks do not fit; the {len(segs)} segments {segs} can give at most {sum(caps)} "
            f"(a segment keeps one block{' ' if allow_empty_segments else ' unless allow_empty_segments'}, "
            "protected blocks stay); remove fewer blocks, use fewer segments, protect fewer blocks"
            + ("" if allow_empty_segments else ", or allow empty segments"))
    alloc = [0] * len(segs)
    left = remove
    active = list(range(len(segs)))  # the first round splits over all segments, later rounds over the open ones
    while left > 0:
        total = sum(sizes[i] for i in active)
        share = {i: divmod(left * sizes[i], total) for i in active}  # (floor, remainder numerator)
        give = {i: share[i][0] for i in active}
        leftover = left - sum(give.values())
        for i in sorted(active, key=lambda i: (-share[i][1], i))[:leftover]:
            give[i] += 1
        for i in active:
            take = min(give[i], caps[i] - alloc[i])
            alloc[i] += take
            left -= take
        active = [i for i in range(len(segs)) if alloc[i] < caps[i]]
    return alloc


def select_removed(segments: Sequence[Sequence[int]], scores: Sequence[float], per_segment: Sequence[int],
                   protected: set[int] | frozenset = frozenset()) -> list[int]:
    """The ``per_segment[i]`` lowest-scoring unprotected blocks of each segment, sorted (ties: lower index)."""
    removed: list[int] = []
    for (a, b), n in zip(check_segments(segments), per_segment):
        candidates = sorted((i for i in range(a, b + 1) if i not in protected), key=lambda i: (scores[i], i))
        if n > len(candidates):
            raise ValueError(f"per_segment: segment [{a}, {b}] has {len(candidates)} removable blocks, asked {n}")
        removed.extend(candidates[:n])
    return sorted(removed)


def segment_of(segments: Sequence[Sequence[int]], num_blocks: int) -> list[int]:
    seg_of = [0] * num_blocks
    for s, (a, b) in enumerate(segments):
        for i in range(a, b + 1):
            seg_of[i] = s
    return seg_of


def capacity(segments: Sequence[Sequence[int]], allow_empty_segments: bool) -> list[int]:
    """Blocks each segment may still give up (all but one unless empty segments are allowed)."""
    return [b - a + 1 - (0 if allow_empty_segments else 1) for a, b in segments]


def fits_frame(removed: Sequence[int], segments: Sequence[Sequence[int]], protected: set[int],
               allow_empty_segments: bool) -> bool:
    """True when ``removed`` spares every protected block and (unless allowed) leaves each segment a block."""
    gone = set(removed)
    if gone & protected:
        return False
    return allow_empty_segments or all(any(i not in gone for i in range(a, b + 1)) for a, b in segments)


def lowest_in_frame(score: Sequence[float], n: int, segments, protected, allow_empty_segments) -> list[int] | None:
    """The n lowest-score blocks overall (ties: lower index), skipping those the frame forbids."""
    seg_of = segment_of(segments, len(score))
    left = capacity(segments, allow_empty_segments)
    out: list[int] = []
    for i in sorted(range(len(score)), key=lambda i: (score[i], i)):
        if len(out) == n:
            break
        if i in protected or left[seg_of[i]] == 0:
            continue
        out.append(i)
        left[seg_of[i]] -= 1
    return sorted(out) if len(out) == n else None
