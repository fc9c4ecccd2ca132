"""One rank of tests/test_train_sharded.py (gloo, CPU), in one of two modes:

`torchrun --nproc_per_node 2 sharded_worker.py STUDENT_DIR OUT_DIR`: the helpers alone.

Each rank loads the tiny student, shards it with FSDP2 as Accelerate's TRANSFORMER_BASED_WRAP
does (one `fully_shard` per decoder layer class in `_no_split_modules`, then the root), takes
one AdamW step on `batch(1)` (the same batch on every rank, so the averaged gradient is the
one-process gradient), gathers the full weights and optimizer state (`kepo.sharded`) and rank 0
writes them (`step1.pt`, and the weights as a Hugging Face folder through `save_model`). Then a
fresh sharded model starts from those weights, loads the gathered optimizer state back
(`load_full_optimizer_state`), steps on `batch(2)`, and rank 0 writes `step2.pt`.

`torchrun --nproc_per_node 2 sharded_worker.py --train DB RUN ITERATION`: the trainer
(`train_iteration`) under Accelerate's own FSDP2 `prepare`. On the CPU Accelerate runs an FSDP
launch as MULTI_CPU (DDP), so `fsdp_accelerator` sets the distributed type and plugin that an
FSDP launch on GPUs sets; everything after that (sharding, no_sync, clipping, the checkpoint)
is Accelerate's and the trainer's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kepo.models import load_policy, save_model
from kepo.sharded import full_model_state, full_optimizer_state, load_full_optimizer_state

LR, WEIGHT_DECAY = 1e-3, 0.01


def batch(seed: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=generator)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(model._no_split_modules)
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return all(isinstance(p, DTensor) for p in params) and any(
        p.to_local().numel() < p.numel() for p in params
    )


def main(student: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model, _ = load_policy(student, dtype="float32", device="cpu")
    vocab = model.config.text_config.vocab_size
    model.train()
    shard(model)
    optimizer = make_optimizer(model)
    step(model, optimizer, batch(1, vocab))
    weights = full_model_state(model)  # collective: every rank
    optim = full_optimizer_state(model, optimizer)  # collective: every rank
    if rank == 0:
        save_model(model, student, out / "policy", state_dict=weights)
        torch.save(
            {"weights": weights, "optimizer": optim, "sharded": is_sharded(model)},
            out / "step1.pt",
        )
    else:
        assert weights == {} and optim == {}, "only rank 0 keeps the gathered state"
    dist.barrier()

    saved = torch.load(out / "step1.pt", weights_only=True)  # every rank reads the file
    resumed, _ = load_policy(student, dtype="float32", device="cpu")
    resumed.load_state_dict(saved["weights"])  # before sharding, as the trainer does
    resumed.train()
    shard(resumed)
    optimizer = make_optimizer(resumed)
    load_full_optimizer_state(resumed, optimizer, saved["optimizer"])  # collective
    step(resumed, optimizer, batch(2, vocab))
    weights = full_model_state(resumed)
    optim = full_optimizer_state(resumed, optimizer)
    if rank == 0:
        torch.save({"weights": weights, "optimizer": optim}, out / "step2.pt")
    dist.barrier()
    dist.destroy_process_group()


def fsdp_accelerator() -> object:
    """An Accelerator running FSDP2 as `train.strategy: fsdp` configures it (kepo/launch.py:
    TRANSFORMER_BASED_WRAP, reshard after forward, full state dict), forced on the CPU."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    accelerator = Accelerator(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert accelerator.is_fsdp2 and accelerator.num_processes == 2
    return accelerator


def train(db: Path, run_id: str, iteration: int) -> None:
    import logging

    from kepo.run import Run
    from kepo.train import train_iteration

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    train_iteration(Run.open(db, run_id), iteration, accelerator=fsdp_accelerator())


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        train(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
