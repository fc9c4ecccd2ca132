"""Teacher scoring: teacher forward tokens and time when only the gated-open trajectories are
scored (kepo) vs scoring every trajectory (what the authors' code does, masking afterwards),
at τ = 0 and τ = 1.

The rollouts are demo-shaped: `--prompts` prompts x G samples, completions of up to
`--tokens` tokens. The gate is eq. 7's 𝟙[r ⋈ τ] with ≥, on the total reward (format +
accuracy, the authors' choice) and on the accuracy reward alone (the demo's choice, because a
warmed-up student always formats). Where the rewards come from:

- default: a documented reward distribution - format reward 1 with probability
  `--p-format` (1.0: the warmed-up demo student always writes the tags), accuracy reward 1
  with probability `--p-accuracy` (0.25: four options, an in-domain student near chance, the
  learning-cliff regime), independently per sample, seeded; completions are random
  non-special tokens of exactly `--tokens` tokens; the teacher is the freshly built tiny teacher.
- `--workdir DIR` (a `kepo demo` workdir): real rollouts - the warmed-up tiny student samples
  G completions for the first `--prompts` curated train prompts (HF backend, the demo's
  temperature 0.9 / top-p 0.95, `--tokens` max new tokens), the rule-based rewards score them,
  and the warmed-up tiny teacher is scored.

What is timed: the trainer's online-distillation teacher call (`kepo.train._Context
.teacher_logits`: build the teacher's sequence batch, then one no-grad forward of the teacher
over prompt + completion), per micro-batch of `--micro-batch` rows as the training step runs
it; a micro-batch whose rows are all gated out costs nothing. The sides alternate
(`all_rows`, then each distinct gated-open row set) after one warm-up, `--repeats` times;
medians. Teacher tokens: the positions the teacher's forward processes (prompt + completion,
padded to the micro-batch's widths), the real (unpadded) tokens among them, and the completion
tokens among those.

    python benchmarks/teacher_scoring.py
    python benchmarks/teacher_scoring.py --workdir work/demo     # real rewards, warmed-up models

Prints a table and one JSON line (prefix `teacher_scoring `).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, alternate, emit_json, medians, print_table, set_threads, tiny_pair
from PIL import Image

from kepo.prompts import PromptItem

PREFIX = "teacher_scoring"
FINDINGS = ["mass", "cyst", "edema", "hemorrhage", "infarct", "normal", "nodule", "fracture"]
GATES = (("total", 0.0), ("total", 1.0), ("accuracy", 0.0), ("accuracy", 1.0))


class _Images:
    def __init__(self, images: dict[str, Image.Image]) -> None:
        self._images = images

    def image(self, question_id: str) -> Image.Image:
        return self._images[question_id]


def synthetic_rollouts(processor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Random completions + rewards drawn from the documented distribution (module docstring)."""
    from kepo.models import stop_token_ids, vision_token_ids

    rng = np.random.default_rng(args.seed)
    tokenizer = processor.tokenizer
    banned = set(stop_token_ids(processor)) | set(vision_token_ids(processor))
    banned |= set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in banned])
    items, images, rows = {}, {}, []
    for p in range(args.prompts):
        pid = f"q{p}"
        options = tuple(FINDINGS[(p + j) % len(FINDINGS)] for j in range(4))
        items[pid] = PromptItem(
            pid, f"Which finding is shown in this MRI scan? ({p})", options, "A"
        )
        pixels = (rng.random((args.image_side, args.image_side, 3)) * 255).astype(np.uint8)
        images[pid] = Image.fromarray(pixels)
        for g in range(args.group):
            fmt = float(rng.random() < args.p_format)
            acc = float(rng.random() < args.p_accuracy)
            rows.append(
                {
                    "prompt_id": pid,
                    "sample_idx": g,
                    "completion_ids": tuple(rng.choice(allowed, size=args.tokens).tolist()),
                    "reward_format": fmt,
                    "reward_accuracy": acc,
                    "reward_total": fmt + acc,
                }
            )
    source = (
        f"documented reward distribution: P(format)={args.p_format}, P(accuracy)={args.p_accuracy}, "
        f"random {args.tokens}-token completions"
    )
    return {"items": items, "questions": _Images(images), "rows": rows, "source": source}


def real_rollouts(
    student: Path, workdir: Path, cfg: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """The warmed-up student's samples on curated train prompts, with their real rewards."""
    from kepo.dataset import QuestionSet
    from kepo.generation import GenerationRequest, SamplingParams
    from kepo.generation.hf import HFBackend
    from kepo.prompts import build_messages
    from kepo.rewards import score_completion

    questions = QuestionSet(workdir / "data")
    ids = sorted(questions.train.column("question_id").to_pylist())[: args.prompts]
    items = {qid: PromptItem.from_row(questions.row(qid)) for qid in ids}
    thinking = cfg.prompts.thinking
    requests = [
        GenerationRequest(
            qid,
            build_messages(items[qid], "train", thinking=thinking),
            questions.image(qid),
            1000 + i,
        )
        for i, qid in enumerate(ids)
    ]
    backend = HFBackend.from_pretrained(
        student, dtype="float32", device="cpu", generation_batch_size=64
    )
    sampling = SamplingParams(n=args.group, temperature=0.9, top_p=0.95, max_new_tokens=args.tokens)
    outputs = backend.generate(requests, sampling, desc="student samples")
    backend.close()
    rows = []
    for qid, completions in zip(ids, outputs, strict=True):
        for c in completions:
            r = score_completion(
                c.text, items[qid].gold_letter, thinking=thinking, n_options=items[qid].n_options
            )
            rows.append(
                {
                    "prompt_id": qid,
                    "sample_idx": c.sample_idx,
                    "completion_ids": tuple(c.token_ids),
                    "reward_format": r.reward_format,
                    "reward_accuracy": r.reward_accuracy,
                    "reward_total": r.reward_total,
                }
            )
    source = f"real rollouts of the warmed-up demo student in {workdir} (rule-based rewards)"
    return {"items": items, "questions": questions, "rows": rows, "source": source}


def gate_mask(rows: list[dict], part: str, tau: float) -> tuple[bool, ...]:
    key = "reward_total" if part == "total" else "reward_accuracy"
    return tuple(r[key] >= tau for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=128)
    parser.add_argument(
        "--micro-batch", type=int, default=16, help="Rows per training micro-batch (the demo's)."
    )
    parser.add_argument("--p-format", type=float, default=1.0)
    parser.add_argument("--p-accuracy", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="A `kepo demo` workdir: real rollouts and rewards.",
    )
    args = parser.parse_args()
    threads_note = set_threads(args.threads)
    import transformers

    from kepo.config import load_config
    from kepo.models import load_policy
    from kepo.train import TrainingData, TrainRow, _Context, make_accelerator

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher_dir, models_note = tiny_pair(Path(tmp) / "models", args.workdir)
        cfg = load_config(
            REPO / "configs" / "demo" / "kepo.yaml",
            overrides={"models.student": str(student), "models.teacher": str(teacher_dir)},
        )
        accelerator = make_accelerator(cfg)
        teacher, teacher_processor = load_policy(
            teacher_dir, dtype="float32", device=accelerator.device
        )
        teacher.requires_grad_(False)
        if args.workdir is not None:
            rollouts = real_rollouts(student, args.workdir, cfg, args)
        else:
            rollouts = synthetic_rollouts(teacher_processor, args)

    rows = rollouts["rows"]
    train_rows = [TrainRow(r["prompt_id"], r["sample_idx"], r["completion_ids"]) for r in rows]
    data = TrainingData(rows=train_rows, items=rollouts["items"])
    ctx = _Context(
        cfg, accelerator, None, None, teacher, teacher_processor, data, rollouts["questions"]
    )
    micro = [
        list(range(i, min(i + args.micro_batch, len(rows))))
        for i in range(0, len(rows), args.micro_batch)
    ]
    tokens: dict[tuple, dict[str, int]] = {}

    def count_tokens(mask: tuple[bool, ...]) -> dict[str, int]:
        """Positions the teacher processes (incl. padding), real tokens, completion tokens."""
        out = {"positions": 0, "tokens": 0, "completion": 0}
        for chunk in micro:
            open_rows = [train_rows[i] for i in chunk if mask[i]]
            if open_rows:
                batch = ctx.sequences(open_rows, teacher_processor)
                out["positions"] += int(batch["input_ids"].numel())
                out["tokens"] += int(batch["attention_mask"].sum())
                out["completion"] += sum(r.n_tokens for r in open_rows)
        return out

    def scorer(mask: tuple[bool, ...]) -> Any:
        tokens[mask] = count_tokens(mask)

        def run() -> float:
            elapsed = 0.0
            for chunk in micro:
                open_rows = [train_rows[i] for i in chunk if mask[i]]
                if not open_rows:  # the trainer skips the teacher for such a micro-batch
                    continue
                start = time.perf_counter()
                ctx.teacher_logits(open_rows)
                elapsed += time.perf_counter() - start
            return elapsed

        return run

    all_mask = tuple(True for _ in rows)
    gates = {f"{part} >= {tau:g}": gate_mask(rows, part, tau) for part, tau in GATES}
    distinct = {"all_rows": all_mask}
    for mask in gates.values():
        if mask not in distinct.values():
            distinct[f"gated_{len(distinct)}"] = mask
    times = alternate({name: scorer(mask) for name, mask in distinct.items()}, repeats=args.repeats)
    med = medians(times)
    name_of = {mask: name for name, mask in distinct.items()}

    print(
        f"{len(rows)} trajectories ({args.prompts} prompts x G={args.group}), {rollouts['source']}; {models_note}"
    )
    print(
        f"teacher: online-distillation forward per micro-batch of {args.micro_batch} rows "
        f"(kepo.train._Context.teacher_logits); cpu, {threads_note}"
    )
    print(f"{args.repeats} alternating repeats after 1 warm-up; medians")
    all_tok, all_time = tokens[all_mask], med["all_rows"]
    table = [
        [
            "every trajectory (authors)",
            len(rows),
            all_tok["positions"],
            all_tok["tokens"],
            all_tok["completion"],
            all_time,
            1.0,
        ]
    ]
    payload_gates = {}
    for label, mask in gates.items():
        name = name_of[mask]
        tok = tokens[mask]
        table.append(
            [
                f"gated-open only, {label}",
                sum(mask),
                tok["positions"],
                tok["tokens"],
                tok["completion"],
                med[name],
                med[name] / all_time,
            ]
        )
        payload_gates[label] = {
            "open_rows": sum(mask),
            "open_share": sum(mask) / len(rows),
            "teacher_positions": tok["positions"],
            "teacher_tokens": tok["tokens"],
            "completion_tokens": tok["completion"],
            "median_s": med[name],
            "time_ratio_gated_over_all": med[name] / all_time,
            "token_ratio_gated_over_all": tok["tokens"] / all_tok["tokens"],
        }
    print_table(
        [
            "teacher scores",
            "rows",
            "positions (padded)",
            "tokens",
            "of them completion",
            "median s",
            "x all",
        ],
        table,
    )
    emit_json(
        PREFIX,
        {
            "rows": len(rows),
            "prompts": args.prompts,
            "group": args.group,
            "max_tokens": args.tokens,
            "micro_batch": args.micro_batch,
            "source": rollouts["source"],
            "models": models_note,
            "threads": args.threads,
            "repeats": args.repeats,
            "all_rows": {
                "teacher_positions": all_tok["positions"],
                "teacher_tokens": all_tok["tokens"],
                "completion_tokens": all_tok["completion"],
                "median_s": all_time,
            },
            "gates": payload_gates,
            "all_s": times,
        },
    )


if __name__ == "__main__":
    main()
