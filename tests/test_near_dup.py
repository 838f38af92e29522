"""The banded near-duplicate index agrees with brute force."""

from __future__ import annotations

import random

import pytest

from omnithought_dagster.seed.near_dup import earliest_near_duplicates


def _brute_force(hashes, owners, max_distance, first_owner):
    best = {}
    for h, o in zip(hashes, owners, strict=False):
        if o < first_owner:
            continue
        for g, p in zip(hashes, owners, strict=False):
            d = bin(h ^ g).count("1")
            if p < o and d <= max_distance:
                candidate = (p, d)
                if o not in best or candidate < best[o]:
                    best[o] = candidate
    return best


@pytest.mark.parametrize("max_distance", [0, 1, 4, 9])
def test_matches_brute_force_on_planted_neighbours(max_distance):
    rng = random.Random(max_distance)
    hashes, owners = [], []
    for owner in range(300):
        for _ in range(rng.choice([1, 1, 2])):
            if hashes and rng.random() < 0.3:
                base = rng.choice(hashes)
                for _ in range(rng.randint(0, max_distance + 2)):  # some within reach, some just beyond
                    base ^= 1 << rng.randrange(64)
                hashes.append(base)
            else:
                hashes.append(rng.getrandbits(64))
            owners.append(owner)
    for first_owner in (0, 120):
        expected = _brute_force(hashes, owners, max_distance, first_owner)
        assert earliest_near_duplicates(hashes, owners, max_distance, first_owner) == expected
        assert expected  # the planted pairs exist


def test_disabled_or_trivial():
    assert earliest_near_duplicates([1, 1], [0, 1], -1) == {}
    assert earliest_near_duplicates([1], [0], 4) == {}
    assert earliest_near_duplicates([5, 5], [0, 0], 4) == {}  # a sample never matches itself
