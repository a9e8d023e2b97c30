"""Collective helpers: rank 0 decides and broadcasts; sums and gathers for logging and evaluation."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from medsapiens.errors import UserError, user_message


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
    """Run `check()` on rank 0 only; if it raises, every rank raises too, with rank 0's message.

    Keeps expensive or external checks (e.g. S3 HEAD requests per shard) to one rank while making
    all ranks stop together instead of hanging in a collective. Rank 0 re-raises its own error;
    the others raise a `UserError` with its message when it was one, else a RuntimeError.
    """
    failure, outcome = None, [None]
    if rank() == 0:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank below
            failure = exc
            message = user_message(exc)
            outcome[0] = ("user", message) if message is not None else ("bug", f"{type(exc).__name__}: {exc}")
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise UserError(message) if kind == "user" else RuntimeError(f"rank 0 failed: {message}")


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
