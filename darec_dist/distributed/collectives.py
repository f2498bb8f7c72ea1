"""Collectives that carry gradients.

Convention that makes W ranks equal one process on the same global batch: each
rank's loss is the mean over its local batch plus the coupled losses computed
over the gathered global batch (the same value on every rank). DeepSpeed
averages dense gradients over ranks, and TorchRec's sharded-embedding
collectives divide embedding gradients by W in their backward
(comm_ops.GRADIENT_DIVISION, on by default); a gather's backward sums the
gradients every rank sends back to a piece's owner. Together this yields exactly
the gradient of (global mean loss + coupled losses).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
# Deprecated in favour of torch.distributed._functional_collectives, whose plain all_gather and all_reduce carry no
# gradient: moving to them would cut every coupled loss's backward silently (tests/test_coupled_losses.py guards it).
import torch.distributed.nn.functional as dist_fn

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The backward of torch.distributed.nn's all_gather hands the gradient pieces to all_to_all as they
    come; under gloo a strided piece (from a later transpose or column slice) is sent as if it were
    dense, which silently corrupts the gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally shaped `x` along dim 0, rank order; gradients flow back to each owner."""
    if world_size() == 1:
        return x
    return _ContiguousGrad.apply(torch.cat(dist_fn.all_gather(x), dim=0))


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's equally shaped `x` concatenated along dim 0, rank order, without gradient (ids, counts)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's `x`, the same on all ranks; each rank's gradient is the sum of all ranks' gradients."""
    if world_size() == 1:
        return x
    return dist_fn.all_reduce(x)


def sum_many_with_grad(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sum_with_grad` of several tensors by name, in one all-reduce (collectives, not arithmetic, are what
    costs on CPU); tensors that need no gradient may ride along. Each comes back in its own dtype (the one
    buffer has the widest)."""
    if not parts:
        return {}
    flat = sum_with_grad(torch.cat([x.flatten() for x in parts.values()]))
    pieces = flat.split([x.numel() for x in parts.values()])
    return {name: piece.view_as(x).to(x.dtype) for (name, x), piece in zip(parts.items(), pieces)}


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, without gradient (metrics, counts)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL carries CUDA tensors only (the process's device, set by
    pick_device); gloo, and a process without a group, CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(*values: int) -> list[int]:
    """The largest of every rank's value, for each of `values` (the same on all ranks; one collective)."""
    if world_size() == 1:
        return list(values)
    x = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """What `decide()` returns on rank 0 (or the error it raises there), on every rank: a choice that every rank
    must share, such as which checkpoint to load, made once. Each rank deciding for itself could choose differently
    while a running job writes or prunes checkpoints, or where a shared filesystem shows nodes different listings."""
    if world_size() == 1:
        return decide()
    outcome: list = [None]
    if rank() == 0:
        try:
            outcome[0] = (decide(), None)
        except Exception as err:  # the other ranks raise it too, instead of waiting for an answer that never comes
            try:
                pickle.dumps(err)
            except Exception:  # it must cross to the other ranks
                err = RuntimeError(f"{type(err).__name__}: {err}")
            outcome[0] = (None, err)
    dist.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def every_rank(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def first_problem(problem: str | None) -> str | None:
    """The first (by rank) of every rank's `problem`, on every rank: work shared out, its failures told to all."""
    return next((p for p in every_rank(problem) if p), None)
