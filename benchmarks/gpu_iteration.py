"""GPU rehearsal: one whole KEPO iteration at the Qwen3-VL-2B shape, time and peak memory per stage.

Random weights, nothing downloaded. The student is the Qwen3-VL-2B-shaped model of
`gpu_step.py`; the teacher is a larger random model (Qwen3-VL-4B-shaped by default, `--teacher
8b` for the 8B shape) saved to a temporary folder and loaded back through
`kepo.models.load_model` with a `device_map` (accelerate splits it: over the GPUs under
`--teacher-max-memory`, the rest offloaded to CPU memory; on a CPU run half its decoder layers
are offloaded to disk, so the dispatch hooks run either way). Stages, in the order of an
iteration:

1. rollout: `--prompts` prompts x `--group` samples of `--new-tokens` tokens (sampling);
2. exploration: for `--explore` prompts, a teacher hint (greedy, `--hint-tokens`) and K =
   `--inject-k` student samples under the hint-aware prompt (prompt + hint);
3. scoring: the student's old log-probs and the teacher's top-k (k = 32) per completion token;
4. train: one optimizer step over all trajectories in micro-batches of `--micro-batch`: student
   forward, online teacher forward on the gate-open rows, GRPO policy term + generalized JSD
   (beta 0.5, kepo.losses), backward, AdamW;
5. evaluate: greedy answers to `--eval-items` prompts.

    python benchmarks/gpu_iteration.py            # a GPU machine: bf16, 2B student + 4B teacher
    python benchmarks/gpu_iteration.py --tiny     # the same code at a tiny shape on the CPU

Prints one JSON line (prefix `gpu_iteration `) and a table: seconds and peak memory per stage
(GPU: the sum over devices of torch's peak allocated memory, reset at each stage; CPU: the
process's peak resident memory, reset at each stage where the kernel allows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, reset_peak_rss
from gpu_step import PRESETS, build_model, image_inputs, mm_token_type_ids, prompt_ids

from kepo.losses import (
    aggregate,
    gated_distillation,
    generalized_jsd,
    group_advantages,
    policy_loss,
    token_logprobs,
)
from kepo.models import input_device, load_model, placement_summary

# Larger teachers: Qwen3-VL-4B / 8B-shaped text towers on the 2B vision tower's layout.
TEACHERS = {
    "4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32
    ),
    "8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4
    ),
}


def teacher_spec(name: str, student_preset: str) -> dict[str, Any]:
    base = PRESETS[student_preset]
    text = {**base["text"], **TEACHERS[name]}
    vision = {**base["vision"], "out_hidden_size": text["hidden_size"]}
    return {"text": text, "vision": vision, "image_side": base["image_side"]}


def build_teacher_folder(name: str, args, dtype: torch.dtype, device: str, folder: Path) -> int:
    """Build the random teacher on `device`, save it to `folder`, free it; returns its size."""
    PRESETS[f"teacher-{name}"] = teacher_spec(name, args.preset)
    model = build_model(f"teacher-{name}", dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n_params


def teacher_device_map(args, folder: Path, on_gpu: bool) -> dict[str, Any]:
    """`load_model` placement: 'auto' under a memory cap on a GPU; half the layers on disk on CPU."""
    if on_gpu:
        caps = dict(item.split("=", 1) for item in args.teacher_max_memory.split(","))
        return {"device_map": "auto", "max_memory": caps}
    n_layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
    device_map = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    for i in range(n_layers):
        device_map[f"model.language_model.layers.{i}"] = "cpu" if i < n_layers // 2 else "disk"
    return {"device_map": device_map, "offload_folder": folder / "offload"}


# ----------------------------------------------------------------------------- measuring
class Stages:
    """Times each stage and records its peak memory (GPU allocated, or CPU resident)."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu
        self.results: dict[str, dict[str, float]] = {}

    def _sync(self) -> None:
        if self.on_gpu:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)

    def run(self, name: str, fn: Callable[[], Any], **extra: float) -> Any:
        if self.on_gpu:
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        rss_reset = reset_peak_rss()
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        seconds = time.perf_counter() - t0
        row: dict[str, float] = {"seconds": seconds, **extra}
        if self.on_gpu:
            per_device = [
                torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())
            ]
            row["peak_gpu_gib"] = sum(per_device)
            row["peak_gpu_gib_per_device"] = per_device  # type: ignore[assignment]
        row["peak_rss_gib" if rss_reset else "rss_high_water_gib"] = peak_rss_mb() / 1024
        self.results[name] = row
        return out


# ----------------------------------------------------------------------------- stages
def suppressed(model) -> list[int]:
    cfg = model.config
    return [
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    ]


def device_of(model) -> torch.device:
    return input_device(model)


@torch.no_grad()
def generate(model, ids, img, *, samples: int, new_tokens: int, greedy: bool) -> torch.Tensor:
    """Completions (rows x samples, new_tokens) exactly `new_tokens` long."""
    device = device_of(model)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        mm_token_type_ids=mm_token_type_ids(model, ids).to(device),
        do_sample=not greedy,
        temperature=None if greedy else 0.9,
        top_p=None if greedy else 0.95,
        top_k=None,
        num_return_sequences=samples,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        suppress_tokens=suppressed(model),
        pad_token_id=0,
        **{k: v.to(device) for k, v in img.items()},
    )
    return out[:, ids.shape[1] :].cpu()


def select_images(img: dict, rows: list[int], n_patches_per_image: int) -> dict:
    pixel = torch.cat(
        [img["pixel_values"][r * n_patches_per_image : (r + 1) * n_patches_per_image] for r in rows]
    )
    return {"pixel_values": pixel, "image_grid_thw": img["image_grid_thw"][rows]}


def completion_logits(model, prompt, completion, img) -> torch.Tensor:
    """Logits (B, Tc, V) predicting each completion token; differentiable."""
    device = device_of(model)
    ids = torch.cat([prompt, completion], dim=1).to(device)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=mm_token_type_ids(model, ids),
        logits_to_keep=completion.shape[1] + 1,
        use_cache=False,
        **{k: v.to(device) for k, v in img.items()},
    )
    return out.logits[:, :-1]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, small counts (CPU)")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="4b")
    p.add_argument(
        "--teacher-max-memory",
        default="0=6GiB,cpu=96GiB",
        help="accelerate max_memory of the teacher on a GPU machine (index=size,...); the default "
        "caps GPU 0 so that part of the 4B teacher is offloaded to CPU memory",
    )
    p.add_argument(
        "--prompts", type=int, default=8, help="rollout prompts (Table 1 per process: 2)"
    )
    p.add_argument("--group", type=int, default=8, help="samples G per prompt")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--explore", type=int, default=2, help="prompts that take the exploration path")
    p.add_argument("--inject-k", type=int, default=2)
    p.add_argument("--hint-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-items", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--prompt-text-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None, help="where the teacher folder goes")
    args = p.parse_args()
    if args.tiny:
        args.teacher = "tiny"
        args.prompts, args.group, args.new_tokens, args.explore = 2, 2, 6, 1
        args.inject_k, args.hint_tokens, args.micro_batch = 1, 4, 2
        args.eval_items, args.eval_tokens, args.prompt_text_tokens = 2, 4, 8
    args.preset = "tiny" if args.tiny else "2b"

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stages = Stages(on_gpu)
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    teacher_dir = Path(tmp.name) / "teacher"

    # --- models
    n_teacher = stages.run(
        "build_teacher_folder",
        lambda: build_teacher_folder(args.teacher, args, dtype, device, teacher_dir),
    )
    placement = teacher_device_map(args, teacher_dir, on_gpu)
    teacher = stages.run(
        "load_teacher_device_map", lambda: load_model(teacher_dir, dtype=dtype, **placement)
    )
    teacher.requires_grad_(False)
    student = stages.run("build_student", lambda: build_model(args.preset, dtype, device))
    n_student = sum(q.numel() for q in student.parameters())

    # --- inputs: one image per prompt
    side = PRESETS[args.preset]["image_side"]
    img, n_image_tokens = image_inputs(student, args.prompts, side, "cpu", dtype)
    patches = img["pixel_values"].shape[0] // args.prompts
    prompts = prompt_ids(student, args.prompts, n_image_tokens, args.prompt_text_tokens, "cpu", gen)

    # 1. rollout
    student.eval()
    completions = stages.run(
        "rollout",
        lambda: generate(
            student, prompts, img, samples=args.group, new_tokens=args.new_tokens, greedy=False
        ),
        sequences=args.prompts * args.group,
        generated_tokens=args.prompts * args.group * args.new_tokens,
    )

    # 2. exploration: teacher hint, then K hint-aware student samples per explored prompt
    explored = list(range(min(args.explore, args.prompts)))

    def explore() -> list[torch.Tensor]:
        sub_img = select_images(img, explored, patches)
        hints = generate(
            teacher, prompts[explored], sub_img, samples=1, new_tokens=args.hint_tokens, greedy=True
        )
        aware = torch.cat([prompts[explored], hints], dim=1)
        return [
            generate(
                student,
                aware,
                sub_img,
                samples=args.inject_k,
                new_tokens=args.new_tokens,
                greedy=False,
            )
        ]

    injected = stages.run("exploration", explore, prompts=len(explored))[0]

    # trajectories: the group of each prompt; for explored prompts the first K replaced (injected)
    row_prompt = torch.arange(args.prompts).repeat_interleave(args.group)  # (P*G,)
    completions = completions.clone()
    for j, prompt_index in enumerate(explored):
        rows = (row_prompt == prompt_index).nonzero().flatten()[: args.inject_k]
        completions[rows] = injected[j * args.inject_k : (j + 1) * args.inject_k]
    rewards = torch.rand(args.prompts * args.group, generator=gen).round()  # (P*G,) 0/1
    gate_open = rewards >= 1.0
    advantages = group_advantages(rewards, row_prompt, estimator="grpo", scale_by_std=True)
    micro = [
        list(range(i, min(i + args.micro_batch, len(row_prompt))))
        for i in range(0, len(row_prompt), args.micro_batch)
    ]

    def micro_inputs(rows: list[int]):
        prompt_rows = row_prompt[rows].tolist()
        return prompts[prompt_rows], completions[rows], select_images(img, prompt_rows, patches)

    # 3. scoring: old log-probs (student) and teacher top-k per completion token
    @torch.no_grad()
    def score() -> torch.Tensor:
        old = []
        for rows in micro:
            prompt, completion, sub_img = micro_inputs(rows)
            logits = completion_logits(student, prompt, completion, sub_img)
            old.append(token_logprobs(logits.float(), completion.to(logits.device)).cpu())
            del logits
            teacher_logits = completion_logits(teacher, prompt, completion, sub_img)
            torch.topk(teacher_logits.float(), k=32, dim=-1)
            del teacher_logits
        return torch.cat(old)

    old_logprobs = stages.run("scoring", score, sequences=len(row_prompt))

    # 4. one training step (GRPO term + gated generalized JSD against the online teacher)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)

    def train_step() -> float:
        total = 0.0
        for rows in micro:
            prompt, completion, sub_img = micro_inputs(rows)
            logits = completion_logits(student, prompt, completion, sub_img)  # (b, Tc, V)
            target = completion.to(logits.device)
            mask = torch.ones(target.shape, device=logits.device)
            logprobs = token_logprobs(logits.float(), target)
            loss_tok, _ = policy_loss(
                logprobs,
                old_logprobs[rows].to(logits.device),
                advantages[rows].to(logits.device),
                mask,
                clip=False,
            )
            loss = aggregate(loss_tok, mask, "token_mean")
            open_rows = gate_open[rows].to(logits.device)
            if open_rows.any():
                with torch.no_grad():
                    teacher_logits = completion_logits(teacher, prompt, completion, sub_img)
                jsd = generalized_jsd(logits, teacher_logits.to(logits.device), beta=0.5)
                distill = gated_distillation(jsd, open_rows)
                loss = loss + distill.sum() / (mask * open_rows[:, None]).sum()
                del teacher_logits
            (loss * len(rows) / len(row_prompt)).backward()
            total += float(loss.detach())
            del logits, logprobs, loss_tok, loss
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    stages.run(
        "train_step",
        train_step,
        sequences=len(row_prompt),
        tokens=int(len(row_prompt) * (prompts.shape[1] + args.new_tokens)),
    )
    optimizer.state.clear()  # the next stage does not need the AdamW moments
    if on_gpu:
        torch.cuda.empty_cache()

    # 5. evaluation: greedy answers to a few items
    student.eval()
    eval_img, _ = image_inputs(student, args.eval_items, side, "cpu", dtype)
    eval_prompts = prompt_ids(
        student, args.eval_items, n_image_tokens, args.prompt_text_tokens, "cpu", gen
    )
    stages.run(
        "evaluate",
        lambda: generate(
            student, eval_prompts, eval_img, samples=1, new_tokens=args.eval_tokens, greedy=True
        ),
        items=args.eval_items,
    )

    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "gpus": torch.cuda.device_count() if on_gpu else 0,
        "dtype": str(dtype).removeprefix("torch."),
        "student_params": n_student,
        "teacher_params": n_teacher,
        "teacher_placement": placement_summary(teacher),
        "settings": {
            k: getattr(args, k)
            for k in (
                "tiny",
                "teacher",
                "prompts",
                "group",
                "new_tokens",
                "explore",
                "inject_k",
                "hint_tokens",
                "micro_batch",
                "eval_items",
                "eval_tokens",
            )
        },
        "stages": stages.results,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print("gpu_iteration " + json.dumps(result))
    print()
    print(
        f"{result['device']} ({result['dtype']}): student {n_student / 1e9:.2f} B, teacher "
        f"{n_teacher / 1e9:.2f} B placed as {result['teacher_placement']}"
    )
    memory_key = "peak_gpu_gib" if on_gpu else None
    print(f"{'stage':<26}{'seconds':>10}{'peak GiB':>12}")
    for name, row in stages.results.items():
        memory = row.get(memory_key) if memory_key else row.get("peak_rss_gib")
        shown = f"{memory:.2f}" if isinstance(memory, float) else "n/a"
        print(f"{name:<26}{row['seconds']:>10.2f}{shown:>12}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
