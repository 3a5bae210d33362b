"""Sets of time intervals: union, intersection, difference and length (nanoseconds).

A set is a sorted list of disjoint ``(start, end)`` pairs; :func:`union` makes one from any
intervals. The step breakdown is a partition of each step's time into such sets.
"""

from __future__ import annotations

from collections.abc import Iterable

Intervals = list[tuple[int, int]]


def union(intervals: Iterable[tuple[int, int]]) -> Intervals:
    """The sorted, disjoint union of `intervals` (empty ones dropped)."""
    merged: Intervals = []
    for start, end in sorted(interval for interval in intervals if interval[1] > interval[0]):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """The intersection of two sets."""
    result: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            result.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return result


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """The part of `a` outside `b`."""
    result: Intervals = []
    j = 0
    for start, end in a:
        cursor = start
        while j < len(b) and b[j][1] <= cursor:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                result.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            result.append((cursor, end))
    return result


def length(intervals: Intervals) -> int:
    """Total length of a set."""
    return sum(end - start for start, end in intervals)
