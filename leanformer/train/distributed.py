"""Data-parallel and sharded training under ``torchrun``, applied in one place.

``context()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group
(NCCL on GPUs, gloo on CPU); ``wrap()`` applies DistributedDataParallel or FSDP2's ``fully_shard``.
A single process gets a disabled context and an unwrapped model.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

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


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict; a collective under FSDP2, so every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name, the same whether the run had 1 process, DDP or
    FSDP2, so a checkpoint resumes on any number of processes. A collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
