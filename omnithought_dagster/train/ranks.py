"""Collectives the trainer and its methods share (below both: a method never imports the trainer for them)."""

from __future__ import annotations


def sum_across_ranks(value: float) -> float:
    """The sum of a number over all ranks (the value itself in a world of one). A collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)
