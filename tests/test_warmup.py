"""The tiny-model warm-up: which examples each model sees, the answer weighting, and that it learns."""

from __future__ import annotations

import torch

from kepo.dataset import QuestionSet
from kepo.warmup import (
    WarmupSettings,
    answer_token_weights,
    student_examples,
    supervised_finetune,
    teacher_examples,
    warmup_rows,
)


def test_answer_token_weights_by_hand() -> None:
    # 1 = <answer>, 2 = </answer>
    ids = torch.tensor([[5, 1, 7, 2, 9], [1, 8, 8, 2, 0], [4, 4, 4, 4, 4]])
    expected = torch.tensor(
        [[1, 1, 3, 1, 1], [1, 3, 3, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32
    )
    assert torch.equal(answer_token_weights(ids, 1, 2, 3.0), expected)


def test_student_never_sees_the_in_domain_modality(curated_bundled) -> None:
    qs = QuestionSet(curated_bundled)
    rows = warmup_rows(qs, exclude_modalities=["MRI"])
    assert rows and all(r["modality"] != "MRI" for r in rows)
    pool_ids = set(qs.pool.column("question_id").to_pylist())
    test_ids = set(qs.test.column("question_id").to_pylist())
    assert {r["question_id"] for r in rows} <= pool_ids and not pool_ids & test_ids
    examples = student_examples(rows, thinking=True)
    kinds = {
        "hint" if "<hint>" in e.messages[0]["content"][-1]["text"] else "plain" for e in examples
    }
    assert kinds == {"hint", "plain"}  # answer format and hint-following
    assert all(e.target.startswith("<think>") and "</think><answer>" in e.target for e in examples)
    teacher = teacher_examples(warmup_rows(qs), thinking=True)
    assert any(e.target.startswith("<hint>") for e in teacher)
    assert {qs.row(e.question_id)["modality"] for e in teacher} >= {"MRI", "CT"}


def test_supervised_finetune_lowers_the_loss_and_saves_a_loadable_model(
    tmp_path, tiny_models, curated_bundled
) -> None:
    from kepo.models import load_policy

    qs = QuestionSet(curated_bundled)
    examples = student_examples(warmup_rows(qs), thinking=True)[:8]
    report = supervised_finetune(
        tiny_models[0],
        examples,
        qs,
        tmp_path / "warm",
        WarmupSettings(steps=12, batch_size=4, learning_rate=3e-3, torch_threads=1),
    )
    assert report.last_loss < 0.7 * report.first_loss, report
    model, _ = load_policy(tmp_path / "warm")
    base, _ = load_policy(tiny_models[0])
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert changed
