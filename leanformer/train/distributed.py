"""Data-parallel and sharded training under ``torchrun``, applied in one place.

``context()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group
(NCCL on GPUs, gloo on CPU); ``wrap()`` applies DistributedDataParallel or FSDP2's ``fully_shard``.
A single process gets a disabled context and an unwrapped model.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from leanformer.config import TrainConfig


@dataclass
class DistContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """The current process's place in a torchrun job (a disabled context outside torchrun)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistContext()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(True, rank, world, local, device)


def wrap(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> nn.Module:
    """DDP or FSDP2 around ``model`` (unchanged for one process). FSDP2 shards each block, then the root;
    on GPU with a bf16 mixed-precision policy (parameters in bf16, gradients reduced in fp32)."""
    if not ctx.enabled:
        return model
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ctx.mode = "ddp"
        return DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ctx.mode = "fsdp"
    kwargs = {}
    if ctx.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def no_sync_unless_last(wrapped: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if ctx.device.type == "cuda" else dist.ReduceOp.SUM)
        if ctx.device.type != "cuda":
            value /= ctx.world_size
    return value


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict, gathered under FSDP2."""
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save(path: Path, model: nn.Module, run_cfg, trainer_state: dict, ctx: DistContext, save_fn) -> Path:
    """Save a single-process-format checkpoint from rank 0 (weights gathered under FSDP2).
    The optimizer state is gathered too, so the checkpoint resumes on any number of processes."""
    if not ctx.enabled:
        return save_fn(path, model, run_cfg, trainer_state)
    raise NotImplementedError  # filled in by the distributed-training issue


def load(path: Path, model: nn.Module, ctx: DistContext, load_fn) -> dict:
    if not ctx.enabled:
        return load_fn(path, model)
    raise NotImplementedError  # filled in by the distributed-training issue
