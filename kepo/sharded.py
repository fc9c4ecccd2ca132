"""The full weights and AdamW state of a sharded model, for the trainer's checkpoint.

Under `train.strategy: fsdp` (Accelerate's FSDP2 plugin) every rank holds one shard of each
parameter (a DTensor) and the matching shard of the AdamW moments, so the main process alone
cannot write `model.safetensors` or `optimizer.pt`. The helpers here are collective: EVERY rank
must call them, in the same order, or the ranks wait on each other forever.

- `full_model_state(model)`: the full state dict, gathered to the CPU of rank 0 (`{}` on the
  other ranks; `torch.distributed.checkpoint.state_dict.get_model_state_dict`).
- `full_optimizer_state(model, optimizer)`: the full optimizer state in the layout of
  `torch.optim.Optimizer.state_dict()` (state keyed by the parameter's index in the
  optimizer's groups, groups listing indices), on rank 0, `{}` elsewhere. That is the layout a
  one-process or DDP run writes, so `optimizer.pt` reads the same either way: a sharded run
  resumes from a DDP checkpoint and the other way round.
- `load_full_optimizer_state(model, optimizer, state)`: that layout loaded into the sharded
  optimizer (each rank keeps its shard; every rank passes the full state).

DeepSpeed ZeRO-3 keeps its optimizer inside its engine, where these calls do not reach it;
`sharded(accelerator)` is true for FSDP only.
"""

from __future__ import annotations

from typing import Any

import torch


def sharded(accelerator: Any) -> bool:
    """Whether the prepared model and optimizer are sharded over the ranks (FSDP)."""
    return accelerator.distributed_type.name == "FSDP"


def is_fsdp_module(model: Any) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard`). Its root parameters are gathered
    only inside its own forward: a submodule called from outside (the vision tower, the inner
    language model) sees shards, so such shortcuts take the model's forward instead."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full_state_dict + cpu_offload: gathered, on the CPU, and kept by rank 0 only
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full state dict of sharded `model` on rank 0 (CPU tensors), else {}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Collective: the full state of `optimizer` (over sharded `model`) on rank 0 in the
    `Optimizer.state_dict()` layout, else {}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_options())
    if not by_name:
        return {}
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    unknown = set(by_name["state"]) - set(index)
    if unknown:
        raise ValueError(f"optimizer state for parameters outside its groups: {sorted(unknown)}")
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
) -> None:
    """Collective: load `state` (the full `Optimizer.state_dict()` layout, on every rank) into
    the sharded `optimizer` of `model`; each rank keeps the shard of its parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = _torch_optimizer(optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in inner.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(names):
        raise ValueError(
            f"the saved optimizer state covers {len(saved)} parameters, the optimizer "
            f"{len(names)}: not the same model"
        )
    name = dict(zip(saved, names, strict=True))
    by_name = {
        "state": {name[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [name[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    # strict=False: a parameter that never had a gradient has no AdamW state, in the saved
    # layout as in torch's own Optimizer.load_state_dict (which accepts that too)
    set_optimizer_state_dict(
        model, inner, by_name, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    # set_optimizer_state_dict first creates a state for every parameter (a zero-gradient step:
    # step 1, zero moments); a parameter without a saved state must start fresh, as it would
    # after Optimizer.load_state_dict, or its first real update is bias-corrected as a second
    stateless = {n for n in names if n not in by_name["state"]}
    for group in inner.param_groups:
        for p in group["params"]:
            if name_of[id(p)] in stateless:
                inner.state.pop(p, None)
