"""Process-group set-up and FSDP2 sharding. The same script runs alone or under
`torchrun --nproc_per_node N`: gloo on CPU, NCCL on GPU, rank 0 logs and writes."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # we created the process group (and destroy it in `cleanup`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto", need_group: bool = False) -> DistInfo:
    """Join the torchrun group if launched by torchrun; else a single process (with a private group of one
    when `need_group`, e.g. FSDP2 mixed precision on one device)."""
    base = pick_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, _local_device(base, local), False)
    backend = "nccl" if base.type == "cuda" else "gloo"
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = _local_device(base, local)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        return DistInfo(dist.get_rank(), world, local, device, True)
    device = _local_device(base, 0)
    if need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(0, 1, 0, device, True)
    return DistInfo(0, 1, 0, device, False)


def _local_device(base: torch.device, local_rank: int) -> torch.device:
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return base


def checkpoint_layers(model: nn.Module) -> nn.Module:
    """Activation checkpointing per decoder/MTP layer (before FSDP2 wraps them): backward recomputes each layer
    from its saved input, so activations cost one layer's worth plus the layer inputs. The wrapper keeps the
    official parameter names in state dicts."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])
    return model


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2: one unit per decoder/MTP layer plus the root. bf16: bf16 compute, fp32 sharded master weights,
    fp32 gradient reduction. Buffers (expert_bias fp32, inv_freq) are not sharded and not cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                              reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
