"""Test data for the trainer, written straight into the store (no rollout code involved).

- `write_curated(dir)`: a curated folder (train/test Parquet with embedded PNG images +
  manifest.json) that `kepo.dataset.QuestionSet` reads.
- `write_rollout_iteration(run, k)`: valid `prompts` / `rollouts` / `teacher_topk` rows for
  iteration k. Completions are short synthetic answers tokenized with the student's tokenizer;
  old and reference log-probs are the real log-probs of the policy being trained (so the ratio
  starts at 1, as on-policy), advantages come from `group_advantages` on the rule-based rewards,
  and the top-k are the teacher model's. One prompt gets an injected hint-aware row that
  replaces a policy row (the replaced row stays, untrained).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from kepo.config import RunConfig, load_config
from kepo.losses import group_advantages
from kepo.models import (
    build_sequence_batch,
    completion_logits,
    completion_mask_of,
    gather_token_logprobs,
    load_policy,
)
from kepo.prompts import LETTERS, PromptItem, build_messages, build_prompt_text
from kepo.rewards import score_completion
from kepo.run import Run
from schemas.tables import QUESTIONS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORDS = ["lesion", "bright", "mass", "normal", "left", "scan", "brain", "edema", "cyst", "round"]


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def question_rows(n: int, *, split: str = "train", rationale: bool = True) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        options = ["MRI", "CT", "X-Ray", "Ultrasound"]
        gold = LETTERS[i % 4]
        png = _png(1000 * (split == "test") + i)
        rows.append(
            {
                "question_id": f"{split}-q{i}",
                "dataset": "unit",
                "modality": "MRI",
                "question_type": "Modality Recognition",
                "question": f"Which modality shows the {WORDS[i % len(WORDS)]}?",
                "options": options,
                "gold_letter": gold,
                "gold_text": options[LETTERS.index(gold)],
                "image_path": f"images/{split}-{i}.png",
                "image_sha256": f"{i:064d}",
                "image_width": 64,
                "image_height": 64,
                "image_bytes": png,
                "image_source": "synthetic",
                "split": split,
                "rationale": f"the {WORDS[i % len(WORDS)]} is bright" if rationale else None,
                "reference_hint": None,
                "difficulty": None,
                "source_file": "QA_information/unit.json",
            }
        )
    return rows


def write_curated(out_dir: Path, n_train: int = 4, *, rationale: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = QUESTIONS.arrow_schema()
    for split, n in (("train", n_train), ("test", 2)):
        rows = question_rows(n, split=split, rationale=rationale)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out_dir / f"{split}.parquet")
    (out_dir / "manifest.json").write_text(json.dumps({"dataset_root": "."}))
    return out_dir


def tiny_config(
    method: str,
    tmp_path: Path,
    models: tuple[Path, Path],
    **overrides: Any,
) -> RunConfig:
    """configs/tiny/<method>.yaml pointed at tmp_path and the test's tiny models."""
    student, teacher = models
    base = {
        "run_id": "t-" + method.replace(".", ""),
        "workdir": str(tmp_path / "work"),
        "data.out_dir": str(tmp_path / "curated"),
        "models.student": str(student),
        "models.teacher": str(teacher),
        "models.device": "cpu",
        "rollout.prompts_per_iteration": 2,
        "rollout.group_size": 2,
        "rollout.sampling.max_new_tokens": 16,
        "rollout.exploration.inject_k": 1,
    }
    base.update(overrides)
    return load_config(CONFIGS / "tiny" / f"{method}.yaml", overrides=base)


def _completion_texts(
    rng: np.random.Generator, item: PromptItem, n: int, thinking: bool
) -> list[str]:
    texts = []
    for _ in range(n):
        letter = LETTERS[int(rng.integers(0, item.n_options))]
        words = " ".join(rng.choice(WORDS, size=2))
        texts.append(
            f"<think>{words}</think><answer>{letter}</answer>"
            if thinking
            else f"<answer>{letter}</answer>"
        )
    return texts


_MODELS: dict[tuple[str, float], Any] = {}


def _load(model_dir: Path):
    """load_policy, cached per folder and modification time (checkpoints get rewritten)."""
    weights = Path(model_dir) / "model.safetensors"
    key = (str(Path(model_dir).resolve()), weights.stat().st_mtime_ns)
    if key not in _MODELS:
        _MODELS[key] = load_policy(model_dir)
    return _MODELS[key]


@torch.no_grad()
def _score(model_dir: Path, messages, images, completions, *, top_k: int = 0):
    """Per row: token log-probs (list) and, with top_k, the (T, k) top ids / log-probs."""
    model, processor = _load(model_dir)
    batch = build_sequence_batch(processor, messages, images, completions)
    logits = completion_logits(model, batch)  # (B, T, V)
    mask = completion_mask_of(batch).bool()
    logprobs = gather_token_logprobs(logits, batch["completion_ids"])
    out = []
    for i, ids in enumerate(completions):
        n = len(ids)
        assert int(mask[i].sum()) == n
        row = {"logprobs": logprobs[i, :n].double().tolist()}
        if top_k:
            values, top = torch.log_softmax(logits[i, :n].float(), -1).topk(top_k, dim=-1)
            row["topk_ids"] = top.tolist()
            row["topk_logprobs"] = values.double().tolist()
        out.append(row)
    return out


def write_rollout_iteration(
    run: Run,
    iteration: int,
    *,
    inject: bool = True,
    top_k: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Write prompts/rollouts/teacher_topk of `iteration` for the run's first train questions."""
    cfg = run.config
    thinking = cfg.prompts.thinking
    questions = run.questions()
    n_prompts, group = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    qids = questions.train.column("question_id").to_pylist()[:n_prompts]
    _, processor = _load(run.policy_path(iteration))
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(seed + iteration)
    max_new = cfg.rollout.sampling.max_new_tokens

    prompts, plan = [], []
    for pos, qid in enumerate(qids):
        row = questions.row(qid)
        item = PromptItem.from_row(row)
        texts = _completion_texts(rng, item, group + (1 if inject and pos == 0 else 0), thinking)
        for s, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_new - 1]
            ids = [*ids, tokenizer.eos_token_id]
            plan.append((pos, qid, item, s, text, ids))
        prompts.append(
            {
                "run_id": run.run_id,
                "iteration": iteration,
                "prompt_id": qid,
                "batch_position": pos,
                "epoch": 0,
                "modality": row["modality"],
                "question_type": row["question_type"],
                "gold_letter": row["gold_letter"],
                "training_prompt": build_prompt_text(item, "train", thinking=thinking),
                "sampling_seed": run.seed("rollout", iteration, qid),
                "n_policy_correct": 0,
                "max_trigger_reward": 0.0,
                "triggered": inject and pos == 0,
                "trigger_reason": "unit_test",
                "n_attempts": 1 if inject and pos == 0 else 0,
                "n_injected": 1 if inject and pos == 0 else 0,
            }
        )

    messages = [build_messages(p[2], "train", thinking=thinking) for p in plan]
    images = [questions.image(p[1]) for p in plan]
    completions = [p[5] for p in plan]
    old = _score(run.policy_path(iteration), messages, images, completions)
    # the reference is the initial student: the same model as the policy in iteration 0
    ref = old if iteration == 0 else _score(Path(cfg.models.student), messages, images, completions)
    offline = cfg.algorithm.name == "kepo" and cfg.algorithm.distill.mode == "offline"
    teacher = (
        _score(Path(cfg.models.teacher), messages, images, completions, top_k=top_k)
        if offline
        else None
    )

    gate = cfg.algorithm.distill.gate
    records = []
    for (pos, qid, item, s, text, ids), o, r in zip(plan, old, ref, strict=True):
        reward = score_completion(
            text, item.gold_letter, thinking=thinking, n_options=item.n_options
        )
        injected = inject and pos == 0 and s == group
        records.append(
            {
                "run_id": run.run_id,
                "iteration": iteration,
                "prompt_id": qid,
                "sample_idx": s,
                "slot": 0 if injected else s,
                "source": "hint" if injected else "policy",
                "trained": not (inject and pos == 0 and s == 0),
                "replaced_by": group if (inject and pos == 0 and s == 0) else None,
                "attempt_id": f"{qid}/b0/k0" if injected else None,
                "generation_prompt": "hint-aware prompt"
                if injected
                else build_prompt_text(item, "train", thinking=thinking),
                "completion_text": text,
                "completion_ids": ids,
                "sampled_logprobs": o["logprobs"],
                "old_logprobs": o["logprobs"],
                "ref_logprobs": r["logprobs"],
                "reward_format": reward.reward_format,
                "reward_accuracy": reward.reward_accuracy,
                "reward_total": reward.reward_total,
                "parsed_answer": reward.parsed_answer,
                "parse_reason": reward.parse_reason,
                "advantage": None,
                "gate_open": False,
                "leak_flag": False,
                "policy_version": iteration,
                "finish_reason": "stop",
                "n_tokens": len(ids),
            }
        )
    trained = [r for r in records if r["trained"]]
    rewards = torch.tensor([r["reward_total"] for r in trained], dtype=torch.float64)
    groups = torch.tensor([qids.index(r["prompt_id"]) for r in trained])
    adv = group_advantages(
        rewards,
        groups,
        estimator=cfg.algorithm.advantage_estimator,
        scale_by_std=cfg.algorithm.scale_by_std,
    )
    part = "reward_total" if gate.reward_part == "total" else "reward_accuracy"
    for r, a in zip(trained, adv.tolist(), strict=True):
        r["advantage"] = a
        value = r[part]
        r["gate_open"] = value >= gate.tau if gate.comparator == ">=" else value > gate.tau
    topk_rows = []
    if teacher is not None:
        for rec, t in zip(records, teacher, strict=True):
            if rec["trained"] and rec["gate_open"]:
                topk_rows.append(
                    {
                        "run_id": run.run_id,
                        "iteration": iteration,
                        "prompt_id": rec["prompt_id"],
                        "sample_idx": rec["sample_idx"],
                        "teacher": str(cfg.models.teacher),
                        "k": top_k,
                        "topk_ids": t["topk_ids"],
                        "topk_logprobs": t["topk_logprobs"],
                    }
                )
    run.store.write_partitions(
        {"prompts": prompts, "rollouts": records, "teacher_topk": topk_rows},
        run_id=run.run_id,
        iteration=iteration,
    )
    return {"prompts": prompts, "rollouts": records, "teacher_topk": topk_rows}


def make_run(cfg: RunConfig, *, n_train: int = 4) -> Run:
    write_curated(Path(cfg.data.out_dir), n_train)
    return Run.create(cfg)


def load_params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
