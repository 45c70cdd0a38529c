"""Data-parallel training under `torchrun`: PyTorch DDP, gloo on CPU, nccl on CUDA.

Without torchrun (no WORLD_SIZE in the environment) every function here is a no-op, so the training
loop reads the same either way.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: str = "auto") -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not enabled():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if use_cuda else "gloo")


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> None:
    if enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_object(obj):
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank (one process: [obj])."""
    if not enabled():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP registers gradient hooks for the parameters that require grad when it is built, so a
    phase that changes requires_grad must build a new wrapper: the loop calls this at every phase."""
    if not enabled() or not any(p.requires_grad for p in model.parameters()):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
