"""Collective helpers: rank 0 decides and broadcasts; sums and gathers for logging and evaluation."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this machine right now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def decide_on_rank0(check) -> None:
    """Run `check()` on rank 0 only; if it raises, every rank raises the same error.

    Keeps expensive or external checks (e.g. S3 HEAD requests per shard) to one rank while making
    all ranks stop together with rank 0's message instead of hanging in a collective.
    """
    message = [None]
    if rank() == 0:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank below
            message[0] = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise SystemExit(f"error: {message[0]}")


def broadcast_from_rank0(objects: list) -> None:
    """Replace the list's items in place by rank 0's."""
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)


def sum_across_ranks(values: dict[str, tuple[float, int]], names: list[str]) -> dict[str, tuple[float, int]]:
    """Sum (value_sum, count) pairs per name over ranks; names missing on a rank count as (0, 0)."""
    t = torch.tensor([[float(s), c] for s, c in (values.get(n, (0.0, 0)) for n in names)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {n: (float(s), int(c)) for n, (s, c) in zip(names, t.tolist()) if c > 0}


def gather_to_rank0(obj):
    """A list of every rank's object on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
