"""Placement across processes: the teacher sharded for inference, and output heads gathered for the chunked loss.

Under FSDP2 a parameter is a `DTensor` holding 1/world_size of its rows between forwards. The chunked loss
uses the output head's weight outside the model's forward, so it gathers that head itself, once a step:
`whole_heads` asks FSDP to unshard the group that owns the head, and the head's gradient (which the chunked
loss computes during its forward) lands on the unsharded parameter, which FSDP reduce-scatters into the
sharded gradient at the end of backward like any other. The teacher is resharded right after the loss, so no
rank keeps a whole replica of it.
"""

from __future__ import annotations

import contextlib
import copy

import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.utils import logging

logger = logging.get_logger(__name__)


def freeze(model) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def prepare_teacher(teacher, accelerator):
    """Freeze the teacher and place it for inference the way the run is distributed.

    FSDP2 shards the teacher's blocks and root like the student's (no full replica per process; the root is
    resharded after each forward, since no backward comes to do it); DeepSpeed ZeRO-3 and FSDP1 wrap it in their
    inference form; any other setup moves it whole to the process's device. It is never wrapped in DDP, since it
    is not trained, and never saved in checkpoints, since the trainer does not own it as `model`.
    """
    freeze(teacher)
    distributed_type = accelerator.distributed_type.name if accelerator.distributed_type is not None else "NO"
    if distributed_type == "DEEPSPEED":
        return _prepare_deepspeed(teacher, accelerator)
    if distributed_type == "FSDP":
        return _prepare_fsdp(teacher, accelerator)
    return teacher.to(accelerator.device)


def _prepare_deepspeed(teacher, accelerator):
    import deepspeed  # optional: only runs under DeepSpeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    # An inference engine: no optimizer, scheduler or optimizer offload; below ZeRO-3 the teacher is
    # simply replicated (stage 0), as it holds no optimizer state to shard.
    # DeepSpeed infers the global batch from the micro batch, accumulation and world size.
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    config.setdefault("zero_optimization", {}).pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _prepare_fsdp(teacher, accelerator):
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        options = {"mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(), "reshard_after_forward": True}
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None and accelerator.parallelism_config is not None:
            options["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        block_types = set(getattr(teacher, "_no_split_modules", None) or [])
        for module in teacher.modules():  # the repeated blocks, then the root, as accelerate shards the student
            if type(module).__name__ in block_types:
                fully_shard(module, **options)
        fully_shard(teacher, **options)
        return teacher
    plugin.set_auto_wrap_policy(teacher)
    return FullyShardedDataParallel(
        teacher,
        sharding_strategy=plugin.sharding_strategy,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        cpu_offload=plugin.cpu_offload,
        device_id=accelerator.device,
        use_orig_params=True,
    )


def fsdp2_owner(model: nn.Module, module: nn.Module) -> FSDPModule | None:
    """The FSDP2 unit whose parameter group holds `module`'s parameters (the innermost one containing it)."""
    owner = None
    for candidate in model.modules():
        if isinstance(candidate, FSDPModule) and any(sub is module for sub in candidate.modules()):
            owner = candidate  # modules() walks outer units before the inner ones they contain
    return owner


def head_is_shardable(model: nn.Module, head: nn.Module | None) -> bool:
    """Whether the chunked loss can use `head` of `model` as placed: whole, or under FSDP2 (gathered per step).

    FSDP1's flat parameters and ZeRO-3's partitions can't be gathered with their gradient outside the
    module's forward, so those runs take full logits at the target positions instead.
    """
    if head is None:
        return False
    if isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return False
    return not any(hasattr(parameter, "ds_id") for parameter in head.parameters())  # a ZeRO-3 partition


@contextlib.contextmanager
def whole_heads(heads: list[tuple[nn.Module, nn.Module, bool]]):
    """Gather each FSDP2-sharded head in `heads` while inside: entries are (model, head, keep_for_backward).

    A head kept for backward stays gathered until FSDP's post-backward reduce-scatters its gradient and
    reshards it; any other (the teacher's, or in evaluation) is resharded on leaving. Whole heads pass through.
    """
    gathered = []
    for model, head, keep_for_backward in heads:
        if not any(isinstance(parameter, DTensor) for parameter in head.parameters()):
            continue  # whole already (no sharding, or FSDP kept it gathered): nothing to search for
        owner = fsdp2_owner(model, head)
        if owner is not None:
            owner.unshard()
            gathered.append((owner, keep_for_backward))
    try:
        yield
    finally:
        for owner, keep_for_backward in gathered:
            if not keep_for_backward:
                owner.reshard()
