"""The training stage on tiny models: parameters move, train_steps and a loadable checkpoint are
written, accumulation equals one big batch, the guard skips non-finite steps, optimizer state
carries over, the data each algorithm trains on, and every Table 1 tiny config runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_fixtures import CONFIGS, load_params, make_run, tiny_config, write_rollout_iteration
from typer.testing import CliRunner

import kepo.train as train_mod
from kepo.config import TrainConfig
from kepo.objectives import gkd_sources
from kepo.run import Run
from kepo.train import (
    TrainingDataError,
    TrainRow,
    gkd_training_rows,
    learning_rate_at,
    load_training_data,
    plan_steps,
    train_iteration,
)

TINY_METHODS = sorted(
    p.stem for p in (CONFIGS / "tiny").glob("*.yaml") if not p.stem.startswith("_")
)


def _max_change(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _steps(run: Run, iteration: int) -> list[dict]:
    return run.store.read("train_steps", {"run_id": run.run_id, "iteration": iteration}).to_pylist()


# ------------------------------------------------------------------------------ pure helpers


def test_default_schedule_is_the_hf_trainer_linear_decay_and_warmup_ratio_rounds_up() -> None:
    # The authors' RL runs fall back to the Hugging Face Trainer's linear decay without warm-up:
    # lr(s) = base * (T - s) / T for optimizer steps s = 0..T-1.
    train = TrainConfig()
    assert train.lr_schedule == "linear" and train.warmup_steps_for(75) == 0
    lrs = [
        learning_rate_at(
            s, base_lr=2e-6, schedule=train.lr_schedule, warmup_steps=0, total_steps=75
        )
        for s in range(75)
    ]
    assert lrs == pytest.approx([2e-6 * (75 - s) / 75 for s in range(75)], rel=1e-12)
    # their SFT: warmup_ratio 0.1 -> ceil(0.1 x steps) warm-up steps, as transformers rounds
    assert TrainConfig(warmup_ratio=0.1).warmup_steps_for(37) == 4
    assert TrainConfig(warmup_ratio=0.1, warmup_steps=2).warmup_steps_for(37) == 2


def test_learning_rate_schedules_by_hand() -> None:
    kw = {"base_lr": 1.0, "warmup_steps": 2, "total_steps": 12}
    assert [learning_rate_at(s, schedule="constant", **kw) for s in (0, 1, 2, 11)] == [0.5, 1, 1, 1]
    assert learning_rate_at(2, schedule="linear", **kw) == 1.0
    assert learning_rate_at(7, schedule="linear", **kw) == pytest.approx(0.5)
    assert learning_rate_at(12, schedule="linear", **kw) == 0.0
    assert learning_rate_at(7, schedule="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate_at(4.5, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert learning_rate_at(50, schedule="cosine", **kw) == 0.0  # clamped past the end


@pytest.mark.parametrize("n_rows,procs", [(13, 1), (13, 2), (8, 3), (1, 2)])
def test_plan_steps_covers_every_row_once_per_pass_with_equal_micro_batch_counts(
    n_rows: int, procs: int
) -> None:
    plans = plan_steps(
        n_rows, passes=2, micro_batch_size=2, grad_accum_steps=2, num_processes=procs, seed=5
    )
    assert plans == plan_steps(
        n_rows, passes=2, micro_batch_size=2, grad_accum_steps=2, num_processes=procs, seed=5
    )
    for p in (0, 1):
        rows = [r for plan in plans if plan.pass_idx == p for r in plan.rows]
        assert sorted(rows) == list(range(n_rows))
    for plan in plans:
        assert len(plan.rows) <= 2 * 2 * procs
        assert len(plan.micro_batches) <= 2
        sharded = [r for micro in plan.micro_batches for shard in micro for r in shard]
        assert sharded == list(plan.rows)
        assert all(
            len(micro) == procs and all(len(s) <= 2 for s in micro) for micro in plan.micro_batches
        )
    assert [p.step for p in plans] == list(range(len(plans)))
    first = [p.rows for p in plans if p.pass_idx == 0]
    second = [p.rows for p in plans if p.pass_idx == 1]
    assert n_rows < 4 or first != second  # reshuffled per pass


# ------------------------------------------------------------------------------ Done-when 3


def test_train_iteration_updates_the_policy_and_writes_steps_and_a_loadable_checkpoint(
    tmp_path: Path, tiny_models
) -> None:
    from transformers import AutoModelForImageTextToText

    from kepo.models import load_policy

    run = make_run(tiny_config("kepo-ke-tau0", tmp_path, tiny_models))
    write_rollout_iteration(run, 0)
    result = train_iteration(run, 0)

    assert result.policy_version == 1 and result.n_steps == 1 and result.n_skipped == 0
    assert result.n_sequences == 4  # 2 prompts x G=2 trained rows (the replaced row is not)
    before, after = load_params(tiny_models[0]), load_params(result.checkpoint_dir)
    assert _max_change(before, after) > 1e-5
    assert all(torch.isfinite(v).all() for v in after.values())

    steps = _steps(run, 0)
    assert len(steps) == 1
    step = steps[0]
    assert not step["skipped"] and step["skip_reason"] is None
    assert step["n_sequences"] == 4 and step["n_tokens"] == result.n_tokens
    assert step["loss_total"] == pytest.approx(step["loss_pg"] + step["loss_distill"], rel=1e-5)
    assert step["loss_distill"] > 0 and step["gate_frac_open"] == 1.0  # τ = 0 opens every gate
    assert step["clipfrac"] == 0.0 and abs(step["approx_kl"]) < 1e-5  # on-policy: ratio 1
    assert step["grad_norm"] > 0 and step["lr"] == run.config.train.learning_rate
    assert step["loss_kl"] is None and step["loss_sft"] is None

    ckpt = run.store.read("checkpoints", {"run_id": run.run_id, "iteration": 1}).to_pylist()
    assert len(ckpt) == 1 and not Path(ckpt[0]["path"]).is_absolute()
    assert run.policy_path(1) == result.checkpoint_dir
    assert (result.checkpoint_dir / "optimizer.pt").is_file()
    model = AutoModelForImageTextToText.from_pretrained(
        result.checkpoint_dir, local_files_only=True
    )
    for name, value in model.state_dict().items():
        if name in after:
            assert torch.equal(value, after[name])
    load_policy(result.checkpoint_dir)  # the processor still produces pixel values

    again = train_iteration(run, 0)  # a rerun replaces the partition and the folder
    assert len(_steps(run, 0)) == again.n_steps == 1
    assert _max_change(after, load_params(again.checkpoint_dir)) < 1e-6
    assert not result.checkpoint_dir.with_name(result.checkpoint_dir.name + ".tmp").exists()


# ------------------------------------------------------------------------------ equivalences


def test_gradient_accumulation_equals_one_big_micro_batch(tmp_path: Path, tiny_models) -> None:
    results = []
    for micro, accum in ((4, 1), (1, 4)):
        overrides = {"train.micro_batch_size": micro, "train.grad_accum_steps": accum}
        run = make_run(
            tiny_config("kepo-ke-tau0", tmp_path / f"m{micro}", tiny_models, **overrides)
        )
        write_rollout_iteration(run, 0)
        result = train_iteration(run, 0)
        results.append((result, _steps(run, 0)[0]))
    (r1, s1), (r2, s2) = results
    assert r1.n_steps == r2.n_steps == 1
    for key in ("loss_total", "loss_pg", "loss_distill", "grad_norm", "clipfrac", "approx_kl"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-5, abs=1e-7), key
    assert _max_change(load_params(r1.checkpoint_dir), load_params(r2.checkpoint_dir)) < 1e-5


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("grpo-thinking", {}),
        ("kepo-ke-tau0", {}),
        ("kepo-ke-tau0", {"algorithm.distill.divergence": "reverse_kl"}),
        ("kepo-ke-tau0", {"algorithm.distill.mode": "offline"}),
    ],
)
def test_chunked_logits_equal_the_materialised_logits(
    tmp_path: Path, tiny_models, method: str, overrides: dict
) -> None:
    """train.logits_chunk_elements (hidden states + LM head, chunk by chunk) trains exactly
    like the plain (B, T, V) path: same loss parts, gradient norm and updated weights."""
    results = []
    for chunk in (None, 5000):  # 5000 logits: 4 positions of the tiny vocabulary per chunk
        over = {**overrides, "train.logits_chunk_elements": chunk}
        run = make_run(tiny_config(method, tmp_path / f"c{chunk}", tiny_models, **over))
        write_rollout_iteration(run, 0, top_k=8)
        result = train_iteration(run, 0)
        results.append((result, _steps(run, 0)[0]))
    (r1, s1), (r2, s2) = results
    for key in ("loss_total", "loss_pg", "loss_distill", "grad_norm", "clipfrac", "approx_kl"):
        if s1[key] is None:
            assert s2[key] is None, key
        else:
            assert s2[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
    if method.startswith("kepo"):
        assert s1["loss_distill"] > 0
    assert _max_change(load_params(r1.checkpoint_dir), load_params(r2.checkpoint_dir)) < 1e-5


def test_vision_once_per_image_equals_one_encoding_per_row(tiny_models) -> None:
    """Rows of one prompt share its image: encoding it once gives the same logits and the same
    gradients as encoding it for every row."""
    import numpy as np
    from PIL import Image

    from kepo.models import build_sequence_batch, completion_logits, load_policy
    from kepo.prompts import PromptItem, build_messages

    model, processor = load_policy(tiny_models[0], dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    items = [PromptItem(f"q{i}", f"Which finding? ({i})", ("a", "b"), "A") for i in range(2)]
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in items]
    keys = ["q0", "q1", "q0", "q0"]  # rows in any order
    batch = build_sequence_batch(
        processor,
        [build_messages(items[int(k[1])], "train") for k in keys],
        [images[int(k[1])] for k in keys],
        [[5, 6, 7], [8, 9], [10, 11, 12], [13]],
    )
    vision = [p for n, p in model.named_parameters() if "visual" in n]

    def run(b):
        model.zero_grad()
        logits = completion_logits(model, b)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), [p.grad.clone() for p in vision]

    calls = []
    handle = model.model.visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        shared = train_mod.vision_once_per_image(model, batch, keys)
        assert "pixel_values" not in shared and "mm_encoder_outputs" in shared
        logits_once, grads_once = run(shared)
        logits_each, grads_each = run(batch)
    finally:
        handle.remove()
    assert calls[0] * 2 == calls[1]  # two distinct images encoded instead of four
    torch.testing.assert_close(logits_once, logits_each, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_once, grads_each, strict=True):  # sums in another order: rounding
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-8
    assert any(float(b.norm()) > 0 for b in grads_each)
    assert train_mod.vision_once_per_image(model, batch, ["a", "b", "c", "d"]) is batch


def test_shared_prompt_forward_equals_the_one_pass_forward(tiny_models) -> None:
    """Each distinct prompt runs once and the rows' completions run on its cached keys/values:
    the completion hidden states and the gradients equal the one-pass forward's (prompts of
    different lengths, left padding, rows in any order), with the prompt tokens embedded once
    per prompt instead of once per row."""
    import numpy as np
    from PIL import Image

    from kepo.models import build_sequence_batch, load_policy, vision_once_per_image
    from kepo.prompts import PromptItem, build_messages

    model, processor = load_policy(tiny_models[0], dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    items = [
        PromptItem("q0", "Which finding?", ("a", "b"), "A"),
        PromptItem(
            "q1", "Which finding is shown in this longer question? (1)", ("a", "b", "c"), "A"
        ),
    ]
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in items]
    keys = ["q1", "q0", "q1", "q0", "q0"]
    completions = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 17]]
    batch = build_sequence_batch(
        processor,
        [build_messages(items[int(k[1])], "train") for k in keys],
        [images[int(k[1])] for k in keys],
        completions,
    )
    assert batch["attention_mask"][:, 0].tolist().count(0) > 0  # some prompt is left-padded
    shared_batch = vision_once_per_image(model, batch, keys)
    params = [p for p in model.parameters() if p.requires_grad]
    weight = torch.randn((*batch["completion_ids"].shape, model.config.text_config.hidden_size))
    embedded: list[int] = []
    handle = model.model.language_model.embed_tokens.register_forward_hook(
        lambda m, a, o: embedded.append(a[0].numel())
    )

    def run(forward):
        model.zero_grad()
        embedded.clear()
        hidden = forward()
        (hidden * weight * train_mod.completion_mask_of(batch)[..., None]).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        return hidden.detach(), grads, sum(embedded)

    try:
        one_pass, grads_one, tokens_one = run(lambda: train_mod.completion_hidden(model, batch))
        shared, grads_shared, tokens_shared = run(
            lambda: train_mod.shared_prompt_hidden(model, shared_batch, keys)
        )
    finally:
        handle.remove()
    prompt = batch["input_ids"].shape[1] - batch["completion_ids"].shape[1]
    width = batch["completion_ids"].shape[1]
    assert tokens_one == 5 * (prompt + width)
    assert tokens_shared == 2 * prompt + 5 * width  # two prompts, five completions
    mask = train_mod.completion_mask_of(batch).bool()
    torch.testing.assert_close(shared[mask], one_pass[mask], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_shared, grads_one, strict=True):  # float rounding of other sums
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-8
    assert any(float(b.norm()) > 0 for b in grads_one)
    # not applicable: no prompt repeats, or two rows of one key with different prompts
    assert train_mod.shared_prompt_hidden(model, batch, ["a", "b", "c", "d", "e"]) is None
    assert train_mod.shared_prompt_hidden(model, batch, ["x", "x", "y", "y", "y"]) is None


def test_optimizer_state_carries_over_between_iterations(tmp_path: Path, tiny_models) -> None:
    run = make_run(tiny_config("grpo-thinking", tmp_path, tiny_models))
    write_rollout_iteration(run, 0)
    train_iteration(run, 0)
    write_rollout_iteration(run, 1)  # sampled from (and scored by) policy version 1
    result = train_iteration(run, 1)
    state = torch.load(result.optimizer_path, weights_only=True)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {2.0}  # AdamW continued: one step in iteration 0, one in iteration 1
    assert _steps(run, 1)[0]["global_step"] == 1
    assert run.policy_path(2) == result.checkpoint_dir

    fresh = make_run(
        tiny_config(
            "grpo-thinking", tmp_path / "fresh", tiny_models, **{"train.save_optimizer": False}
        )
    )
    write_rollout_iteration(fresh, 0)
    assert train_iteration(fresh, 0).optimizer_path is None
    assert not (fresh.checkpoint_dir(1) / "optimizer.pt").exists()
    assert fresh.store.read("checkpoints", {"run_id": fresh.run_id}).column(
        "optimizer_path"
    ).to_pylist() == [None]


def test_non_finite_step_is_skipped_and_recorded(tmp_path: Path, tiny_models) -> None:
    run = make_run(tiny_config("grpo-thinking", tmp_path, tiny_models))
    rows = write_rollout_iteration(run, 0)
    trained = [r for r in rows["rollouts"] if r["trained"]]
    trained[1]["advantage"] = float("nan")
    run.store.write_partitions(rows, run_id=run.run_id, iteration=0)
    result = train_iteration(run, 0)
    step = _steps(run, 0)[0]
    assert result.n_skipped == 1 and step["skipped"]
    assert "non-finite" in step["skip_reason"]
    assert step["loss_total"] is None
    assert _max_change(load_params(tiny_models[0]), load_params(result.checkpoint_dir)) == 0.0


# ------------------------------------------------------------------------------ data per algorithm


def test_stored_training_prompt_must_match_the_templates(tmp_path: Path, tiny_models) -> None:
    run = make_run(tiny_config("grpo-thinking", tmp_path, tiny_models))
    rows = write_rollout_iteration(run, 0)
    rows["prompts"][1]["training_prompt"] += " (edited)"
    run.store.write_partitions(rows, run_id=run.run_id, iteration=0)
    with pytest.raises(TrainingDataError, match=r"train-q1.*templates"):
        train_iteration(run, 0)


def test_missing_rollout_is_a_clear_error(tmp_path: Path, tiny_models) -> None:
    run = make_run(tiny_config("grpo-thinking", tmp_path, tiny_models))
    with pytest.raises(TrainingDataError, match="run the rollout stage of iteration 0"):
        train_iteration(run, 0)


def test_online_teacher_runs_only_on_gated_open_rows(
    tmp_path: Path, tiny_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tiny_config("kepo-ke-tau1", tmp_path, tiny_models))
    rows = write_rollout_iteration(run, 0)
    trained = [r for r in rows["rollouts"] if r["trained"]]
    for r, gate in zip(trained, (True, False, False, True), strict=True):
        r["gate_open"] = gate
    run.store.write_partitions(rows, run_id=run.run_id, iteration=0)

    seen: list[list[bool]] = []
    original = train_mod._Context.teacher_logits

    def spy(self, rows, **kw):
        seen.append([r.gate_open for r in rows])
        return original(self, rows, **kw)

    monkeypatch.setattr(train_mod._Context, "teacher_logits", spy)
    train_iteration(run, 0)
    assert seen and all(all(flags) for flags in seen)
    assert sum(len(flags) for flags in seen) == 2
    assert _steps(run, 0)[0]["gate_frac_open"] == 0.5


def test_offline_distillation_reads_stored_topk_without_loading_the_teacher(
    tmp_path: Path, tiny_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(
        tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **{"algorithm.distill.mode": "offline"})
    )
    rows = write_rollout_iteration(run, 0, top_k=8)
    loaded: list[Path] = []
    original = train_mod.load_policy

    def spy(path, **kw):
        loaded.append(Path(path))
        return original(path, **kw)

    monkeypatch.setattr(train_mod, "load_policy", spy)
    train_iteration(run, 0)
    assert loaded == [Path(tiny_models[0])]
    step = _steps(run, 0)[0]
    assert step["loss_distill"] > 0 and not step["skipped"]

    run.store.write_partitions(
        {**rows, "teacher_topk": rows["teacher_topk"][1:]}, run_id=run.run_id, iteration=0
    )
    with pytest.raises(TrainingDataError, match="no teacher_topk row"):
        train_iteration(run, 0)


@pytest.mark.parametrize("lam,expect", [(1.0, "samples"), (0.0, "targets")])
def test_gkd_lambda_picks_samples_or_targets(
    tmp_path: Path, tiny_models, lam: float, expect: str
) -> None:
    run = make_run(
        tiny_config("gkd-lambda0", tmp_path, tiny_models, **{"algorithm.gkd_lambda": lam})
    )
    write_rollout_iteration(run, 0)
    from kepo.models import load_processor

    tokenizer = load_processor(tiny_models[0]).tokenizer
    data = load_training_data(run, 0, tokenizer)
    if expect == "samples":
        # one sample per prompt (λ = fraction of training samples that are on-policy)
        assert len(data.rows) == 2 and all(not r.is_target for r in data.rows)
        assert len({r.prompt_id for r in data.rows}) == 2
        assert all(data.gkd_on_policy.values())
    else:
        assert len(data.rows) == 2 and all(r.is_target for r in data.rows)
        texts = [tokenizer.decode(r.completion_ids) for r in data.rows]
        assert texts == ["<answer>A</answer><|im_end|>", "<answer>B</answer><|im_end|>"]


def test_gkd_lambda_is_the_fraction_of_training_samples_that_are_on_policy() -> None:
    prompt_ids = [f"q{i:03d}" for i in range(400)]
    group = 8
    rollout_rows = [
        TrainRow(pid, g, (5, 6, 7)) for pid in prompt_ids for g in reversed(range(group))
    ]
    on_policy = gkd_sources(prompt_ids, lam=0.5, seed=11)
    targets = {pid: (1, 2) for pid in prompt_ids if not on_policy[pid]}
    rows = gkd_training_rows(prompt_ids, rollout_rows, targets, on_policy)
    assert [r.prompt_id for r in rows] == prompt_ids  # one training sample per prompt
    student_share = sum(not r.is_target for r in rows) / len(rows)
    assert student_share == sum(on_policy.values()) / len(prompt_ids)
    assert 0.45 < student_share < 0.55  # λ = 0.5 (400 coin flips), not 8/9
    assert all(r.sample_idx == 0 for r in rows if not r.is_target)
    with pytest.raises(TrainingDataError, match="no trained rollout row"):
        gkd_training_rows(["q000"], [], {}, {"q000": True})


def test_nominal_steps_count_one_gkd_row_per_prompt_and_its_passes(
    tmp_path: Path, tiny_models
) -> None:
    cfg = tiny_config(
        "gkd-lambda0.5",
        tmp_path,
        tiny_models,
        **{
            "rollout.prompts_per_iteration": 8,
            "rollout.group_size": 8,
            "train.micro_batch_size": 2,
            "train.grad_accum_steps": 2,
            "train.passes": 3,
            "train.sft_epochs": 5,
        },
    )
    # 8 rows (one per prompt), 4 per step, 3 passes -> 6 steps (not 8 x 8 rows, not 5 epochs)
    assert train_mod.nominal_steps_per_iteration(cfg, 1) == 6


def test_sft_targets_carry_the_rationale_in_thinking_mode(tmp_path: Path, tiny_models) -> None:
    run = make_run(tiny_config("sft", tmp_path, tiny_models, **{"prompts.thinking": True}))
    write_rollout_iteration(run, 0)
    from kepo.models import load_processor

    tokenizer = load_processor(tiny_models[0]).tokenizer
    data = load_training_data(run, 0, tokenizer)
    assert [tokenizer.decode(r.completion_ids) for r in data.rows] == [
        "<think>the lesion is bright</think><answer>A</answer><|im_end|>",
        "<think>the bright is bright</think><answer>B</answer><|im_end|>",
    ]


# ------------------------------------------------------------------------------ CLI


def test_kepo_train_command(tmp_path: Path, tiny_models) -> None:
    from kepo.cli import app

    run = make_run(tiny_config("grpo-nonthinking", tmp_path, tiny_models))
    write_rollout_iteration(run, 0)
    out = CliRunner().invoke(
        app, ["train", "--db", str(run.config.db_path), "--run", run.run_id, "--iteration", "0"]
    )
    assert out.exit_code == 0, out.output
    assert "policy version 1" in out.output
    assert run.policy_path(1).is_dir()
    missing = CliRunner().invoke(
        app, ["train", "--db", str(run.config.db_path), "--run", run.run_id, "--iteration", "3"]
    )
    assert missing.exit_code == 1


# ------------------------------------------------------------------------------ Done-when 5


@pytest.mark.parametrize("method", TINY_METHODS)
def test_every_table1_tiny_config_trains_one_iteration(
    tmp_path: Path, tiny_models, method: str
) -> None:
    run = make_run(tiny_config(method, tmp_path, tiny_models))
    write_rollout_iteration(run, 0)
    result = train_iteration(run, 0)
    step = _steps(run, 0)[0]
    assert result.n_steps >= 1 and result.n_skipped == 0
    assert _max_change(load_params(tiny_models[0]), load_params(result.checkpoint_dir)) > 0
    name = run.config.algorithm.name
    expected = {
        "sft": {"loss_sft"},
        "gkd": {"loss_distill"},
        "grpo": {"loss_pg"},
        "kepo": {"loss_pg", "loss_distill"},
    }[name]
    present = {k for k in ("loss_pg", "loss_kl", "loss_distill", "loss_sft") if step[k] is not None}
    assert present == expected
    assert math.isfinite(step["loss_total"])


@pytest.mark.parametrize(
    "method,overrides,part",
    [("sft", {}, "loss_sft"), ("gkd-lambda0", {"algorithm.gkd_lambda": 0.0}, "loss_distill")],
)
def test_targets_only_methods_train_after_a_rollout_that_loads_no_model(
    tmp_path: Path, tiny_models, monkeypatch: pytest.MonkeyPatch, method, overrides, part
) -> None:
    """SFT and MM-GKD λ = 0: the rollout stage records the prompts without loading a model or
    generating, and the trainer trains on one dataset target per prompt from those prompts."""
    import kepo.rollout as rollout_mod

    def no_model(*_a, **_kw):
        raise AssertionError("the rollout stage loaded a model it never uses")

    monkeypatch.setattr(rollout_mod, "_make_backend", no_model)
    run = make_run(tiny_config(method, tmp_path, tiny_models, **overrides))
    rollout_mod.run_rollout(run, 0)
    assert run.store.read("rollouts", {"run_id": run.run_id}).num_rows == 0
    result = train_iteration(run, 0)
    assert result.n_sequences == run.config.rollout.prompts_per_iteration
    step = _steps(run, 0)[0]
    assert step[part] is not None and math.isfinite(step["loss_total"]) and not step["skipped"]
