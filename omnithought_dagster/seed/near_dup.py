"""Near-duplicate images by perceptual hash: for each item, the earliest earlier item within a distance.

Pigeonhole banding (multi-index hashing): split the 64-bit hash into d+1 bands; two hashes
within Hamming distance d agree exactly on at least one band. Only items sharing a band
value are compared, with vectorised popcounts, so the cost follows the bucket sizes rather
than n^2. Items are owned by samples in a global order (earlier sources first, then record
order); an item is never matched to its own sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Rows of a bucket compared at once; bounds the xor matrix to CHUNK x bucket size.
CHUNK = 2048


def earliest_near_duplicates(
    hashes: Sequence[int], owners: Sequence[int], max_distance: int, first_owner: int = 0
) -> dict[int, tuple[int, int]]:
    """Map owner -> (earliest earlier owner within max_distance, distance), for owners >= first_owner.

    hashes[i] is a 64-bit perceptual hash owned by sample position owners[i]. A sample with
    several images takes its earliest match over all of them (ties: the smaller distance).
    """
    if max_distance < 0 or len(hashes) < 2:
        return {}
    values = np.asarray([int(h) & 0xFFFFFFFFFFFFFFFF for h in hashes], dtype=np.uint64)
    positions = np.asarray(owners, dtype=np.int64)
    best_owner = np.full(len(values), np.iinfo(np.int64).max, dtype=np.int64)
    best_distance = np.full(len(values), 65, dtype=np.int64)

    for shift, width in _bands(max_distance):
        keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends, strict=False):
            if end - start < 2:
                continue
            members = order[start:end]
            _match_bucket(members, values, positions, max_distance, first_owner, best_owner, best_distance)

    result: dict[int, tuple[int, int]] = {}
    for i in np.flatnonzero(best_owner != np.iinfo(np.int64).max):
        owner = int(positions[i])
        candidate = (int(best_owner[i]), int(best_distance[i]))
        if owner not in result or candidate < result[owner]:
            result[owner] = candidate
    return result


def _bands(max_distance: int) -> list[tuple[int, int]]:
    count = min(max_distance + 1, 64)
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts = np.cumsum([0, *widths[:-1]])
    return list(zip((int(s) for s in shifts), widths, strict=False))


def _match_bucket(members, values, positions, max_distance, first_owner, best_owner, best_distance) -> None:
    member_values = values[members]
    member_owners = positions[members]
    queries = np.flatnonzero(member_owners >= first_owner)
    for offset in range(0, len(queries), CHUNK):
        rows = queries[offset : offset + CHUNK]
        distance = np.bitwise_count(member_values[rows, None] ^ member_values[None, :]).astype(np.int64)
        earlier = member_owners[None, :] < member_owners[rows, None]
        ok = earlier & (distance <= max_distance)
        if not ok.any():
            continue
        # Earliest owner first, then the smallest distance: encode both in one sortable number.
        score = np.where(ok, member_owners[None, :] * 128 + distance, np.iinfo(np.int64).max)
        pick = score.argmin(axis=1)
        for k in np.flatnonzero(ok[np.arange(len(rows)), pick]):
            item, column = members[rows[k]], pick[k]
            candidate = (int(member_owners[column]), int(distance[k, column]))
            if candidate < (int(best_owner[item]), int(best_distance[item])):
                best_owner[item], best_distance[item] = candidate
