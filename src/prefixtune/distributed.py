"""What training needs from accelerate beyond `prepare`: FSDP2 with a replicated prefix, agreement across processes.

Modes (chosen by `accelerate launch`, see configs/accelerate/): one process; DDP (the whole frozen base and
the prefix on every process, gradients averaged by DDP); FSDP2 (`fully_shard` via accelerate's FSDP plugin,
fsdp_version 2): the frozen base is sharded over the processes, one unit per decoder layer, while the prefix
parameters are left out of FSDP (`ignored_params`): they stay plain tensors, replicated on every process,
their gradients averaged here. So the optimizer, its resume state and the saved prefix are the full ones on
every process, as in DDP. DeepSpeed ZeRO-3 goes through accelerate's DeepSpeed plugin (GPU only).
"""

from __future__ import annotations

import os

import torch
from torch import nn


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(device: str = "auto"):
    """The run's Accelerator on `device` (ModelConfig.device: auto, cpu, cuda, cuda:N, mps; under a multi-process
    launch each process takes its own local GPU, as accelerate assigns them). The scheduler steps once per optimizer step on every process (accelerate's default
    steps it num_processes times, which would make the schedule depend on the number of processes).

    accelerate 1.15 never turns a CPU run (MULTI_CPU, gloo) into FSDP even when launched with an FSDP config
    (state.py promotes only GPU-like device types): the FSDP settings would be dropped silently and the run
    would be DDP. torch's fully_shard works on CPU with gloo, so the promotion is done here, with the plugin
    accelerate builds from the launcher's FSDP_* variables."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from .config import resolve_device

    device = resolve_device(device)
    kind, _, index = device.partition(":")
    if index and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # accelerate takes the current CUDA device
        torch.cuda.set_device(int(index))
    acc = Accelerator(cpu=kind == "cpu", step_scheduler_with_optimizer=False)
    if _flag("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        # both shared states, as AcceleratorState.__init__ does: a later AcceleratorState() re-reads PartialState's
        acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if _flag("ACCELERATE_USE_DEEPSPEED") and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(f"the launch config asks for DeepSpeed, but accelerate set up {acc.distributed_type.value} "
                         "(DeepSpeed needs CUDA GPUs and `pip install deepspeed`); use configs/accelerate/fsdp.yaml "
                         "or ddp.yaml on this machine")
    if is_fsdp(acc) and not hasattr(acc.state.fsdp_plugin, "fsdp_version"):
        import accelerate

        raise ValueError(f"FSDP2 needs accelerate >= 1.6 (FullyShardedDataParallelPlugin.fsdp_version); this is "
                         f"accelerate {accelerate.__version__}: `pip install -U accelerate`, or train with DDP")
    if is_fsdp(acc) and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_version {acc.state.fsdp_plugin.fsdp_version} in the launch config: prefixtune "
                         "supports FSDP2 only; set fsdp_config: {fsdp_version: 2} (configs/accelerate/fsdp.yaml)")
    return acc


def is_fsdp(acc) -> bool:
    return getattr(acc.distributed_type, "value", None) == "FSDP"


def mode(acc) -> str:
    """"single", "ddp", "fsdp" or "deepspeed": for logs and the benchmark."""
    if acc.num_processes == 1:
        return "single"
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(acc.distributed_type.value, "ddp")


class _Held(nn.Module):
    """Holds existing parameters (not copies) so that accelerate's `ignored_modules` can name them."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.held = nn.ParameterList(params)


def configure_fsdp(acc, base: nn.Module, trainable: list[nn.Parameter]) -> None:
    """Before `prepare`: keep the trainable prefix out of FSDP (process 0's values on every process), and shard the
    base per decoder layer.

    The base model's own `_no_split_modules` (e.g. LlamaDecoderLayer) names the layer class when the config
    gives no fsdp_transformer_layer_cls_to_wrap: the module prepared is TargetLoss, which has none."""
    if not is_fsdp(acc):
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = acc.state.fsdp_plugin
    if plugin.ignored_modules is not None:
        raise ValueError(f"fsdp_ignored_modules {plugin.ignored_modules!r} in the launch config: prefixtune sets "
                         "the ignored (replicated) parameters itself; remove it")
    plugin.ignored_modules = [_Held(trainable)]
    for p in trainable:  # FSDP does not sync ignored parameters; DDP broadcasts process 0's at wrapping: do the same
        torch.distributed.broadcast(p.data, src=0)
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = list(getattr(base, "_no_split_modules", None) or [])


def average_replicated_grads(acc, params: list[nn.Parameter]) -> None:
    """FSDP only: average the prefix gradients over processes, as DDP does for its parameters.

    One flat all-reduce (gloo has no AVG: sum, then divide). A missing gradient is sent as zeros, so that every
    process sends the same-sized buffer, and stays missing (AdamW skips a parameter without one)."""
    if not is_fsdp(acc) or acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= acc.num_processes
    offset = 0
    for p, g in zip(params, grads):
        if p.grad is not None:
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def all_true(acc, value: bool) -> bool:
    """True on every process only if `value` is true on every process (an all-reduce of a flag with max), so
    that all processes take the same branch (skip or step) and none waits in a collective the others left."""
    if acc.num_processes == 1:
        return bool(value)
    bad = torch.tensor([0.0 if value else 1.0], device=acc.device)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item() == 0.0)


def describe(acc, model: nn.Module, base: nn.Module) -> str:
    """One log line: the mode, and under FSDP how much of the frozen base this process holds."""
    what = f"{mode(acc)} over {acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
    if not is_fsdp(acc):
        return what
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    total = sum(p.numel() for p in base.parameters())  # a DTensor counts its global size
    local = sum(getattr(p, "_local_tensor", p).numel() for p in base.parameters())
    return (f"{what}: frozen base sharded by fully_shard in {units} units, this process holds {local:,} of its "
            f"{total:,} numbers; prefix replicated")
