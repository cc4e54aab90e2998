"""Bin samples into rows of at most ``max_len`` tokens: best-fit decreasing, deterministic.

Packing runs over one window of samples at a time (a block, see prepare.py), so memory stays bounded by the
window and the result depends only on the window's content. Best-fit decreasing places every sample, longest
first, into the open row with the least room that still fits it; it is never worse than first-fit decreasing
and leaves rows fuller, which is what the efficiency number measures.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack_bins(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group sample indices into rows whose summed lengths are <= max_len.

    Returns the rows in creation order, each a list of sample indices in placement order. Ties (equal
    lengths, equal room) are broken by index, so the same lengths always give the same rows.
    """
    if any(length > max_len or length <= 0 for length in lengths):
        raise ValueError(f"every length must be in 1..{max_len} to pack into rows of {max_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Open rows as (room left, row id), sorted: bisect finds the tightest row that still fits.
    open_rows: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(open_rows, (length, -1))
        if slot == len(open_rows):
            row_id = len(rows)
            rows.append([index])
            room = max_len - length
        else:
            room, row_id = open_rows.pop(slot)
            rows[row_id].append(index)
            room -= length
        if room > 0:
            bisect.insort(open_rows, (room, row_id))
    return rows


def packing_efficiency(lengths: Sequence[int], rows: int, max_len: int) -> float:
    """Real tokens / row slots: 1.0 when every row is full."""
    return sum(lengths) / (rows * max_len) if rows else 1.0
