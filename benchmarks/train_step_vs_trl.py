"""One training step: kepo's GRPO and KEPO steps against TRL's `GRPOTrainer` step.

Same tiny Qwen3-VL student (kepo.tiny), same batch (`--prompts` x `--group` rows, every
completion exactly `--tokens` tokens, one `--image-side` px image per prompt), fp32 on the
CPU, AdamW with the same lr / betas / weight decay / eps, gradient clipping at 1.0, constant
learning rate, one micro-batch per optimizer step (all rows), token-mean PPO-clipped policy
loss (TRL always clips), no KL term, and activation checkpointing off on both sides (kepo's
default; TRL's GRPOConfig turns it on by default, which trades time for memory:
`--gradient-checkpointing` turns it on for both).

What each side times (wall clock, and this process's CPU seconds, which a machine shared with
other processes disturbs less; one optimizer step):

- `kepo_grpo`, `kepo_kepo`: `kepo.train._optimizer_step` on an in-memory `TrainingData` - the
  function `train_iteration` calls per step, minus the store read and checkpoint write around
  the loop. Inside: `build_sequence_batch` (chat template, tokenizer, image processor),
  the student forward, `kepo.objectives` (GRPO; KEPO adds the online teacher forward on the
  gated-open rows and the JSD(0.5) over the full vocabulary), backward, gradient clipping,
  AdamW. Stored old log-probs and advantages are inputs (the rollout stage computed them).
- `trl_grpo`: TRL's own `Trainer.train()` loop for `1 + repeats` steps, timed from
  `on_step_begin` to `on_step_end` (a TrainerCallback): `training_step` (TRL's
  `_generate_and_score_completions`: chat template + tokenizer + image processor for the
  prompts, the generation call, completion decoding, the reward function, group advantages,
  the processor pass again for the forward's pixel values; then `_compute_loss` with its fused
  log-prob/entropy head, backward), gradient clipping, AdamW, scheduler step. The ONLY part
  replaced is `_generate_single_turn`, which returns the fixed completions instead of calling
  `model.generate`. loss_type "dapo" (TRL's default: token mean), beta 0, num_iterations 1
  (so TRL computes no old log-prob forward, as ours reads them from the store).

Same work: both GRPO sides start from the same weights on the same batch, so their first
steps must compute the same loss and the same pre-clip gradient norm; the script prints both
(TRL's from its `compute_loss` and `_clip_grad_norm`) and whether they agree within
|d loss| <= 1e-5 and a relative gradient-norm difference <= 1e-4 (fp32, different operation
orders). The first step's loss is 0 up to rounding on both sides (ratio 1, zero-mean group
advantages, equal lengths), so the gradient norm is the check with teeth.

The three sides alternate step by step in one process (TRL's callback runs our two steps after
each TRL step), one untimed warm-up step each, then `--repeats` timed ones; medians reported.
Peak memory: each side again in a fresh subprocess (`--memory-side`), two steps; the second
is measured: the growth of the peak resident set over the RSS just before that step (VmHWM
reset through /proc/self/clear_refs, glibc's mmap threshold fixed; see _common.py). That is
the step's transient memory (activations, logits, gradients); AdamW's state already exists.

    python benchmarks/train_step_vs_trl.py
    python benchmarks/train_step_vs_trl.py --prompts 2 --group 8 --tokens 64 --repeats 5
    python benchmarks/train_step_vs_trl.py --workdir work/demo   # warmed-up demo models

Prints a table and one JSON line (prefix `train_step_vs_trl `). Needs the `bench` extra (trl).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    MEMORY_ENV,
    REPO,
    emit_json,
    medians,
    peak_rss_mb,
    print_table,
    reset_peak_rss,
    rss_mb,
    run_json_subprocess,
    set_threads,
    tiny_pair,
)
from PIL import Image

from kepo.prompts import PromptItem, build_messages

PREFIX = "train_step_vs_trl"
MEMORY_PREFIX = "train_step_memory"
SIDES = ("kepo_grpo", "kepo_kepo", "trl_grpo")
FINDINGS = ["mass", "cyst", "edema", "hemorrhage", "infarct", "normal", "nodule", "fracture"]


# ------------------------------------------------------------------------------ the batch
@dataclass
class Batch:
    """The rows both sides train on."""

    items: list[PromptItem]
    images: list[Image.Image]
    completions: list[list[int]]
    """(P * G) completion id lists, prompt-major."""
    rewards: list[float]
    gate_open: list[bool]
    group: int

    def prompt_of(self, row: int) -> int:
        return row // self.group


def make_batch(processor: Any, args: argparse.Namespace) -> Batch:
    """P prompts of one length with a random image each, G completions of exactly T
    non-special tokens.

    Rewards: format 1 for every row, accuracy 1 for the first round(gate_open x G) rows of each
    group (the demo gate is accuracy >= 1, so those rows are the gated-open ones).
    """
    from kepo.models import stop_token_ids, vision_token_ids

    rng = np.random.default_rng(0)
    tokenizer = processor.tokenizer
    banned = set(stop_token_ids(processor)) | set(vision_token_ids(processor))
    banned |= set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in banned])
    items, images = [], []
    for p in range(args.prompts):
        # Every prompt the same length (only the case number differs): with left padding of
        # different widths TRL's log-probs of a row change (measured: a 4.5e-4 relative
        # gradient-norm gap), ours do not, and the two sides would not do the same work.
        options = tuple(FINDINGS[:4])
        items.append(
            PromptItem(f"q{p}", f"Which finding is shown in this MRI scan? ({p})", options, "A")
        )
        pixels = (rng.random((args.image_side, args.image_side, 3)) * 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    n_open = round(args.gate_open * args.group)
    completions, rewards, gates = [], [], []
    for _p in range(args.prompts):
        for g in range(args.group):
            completions.append(rng.choice(allowed, size=args.tokens).tolist())
            correct = g < n_open
            rewards.append(1.0 + float(correct))
            gates.append(correct)
    return Batch(items, images, completions, rewards, gates, args.group)


# ------------------------------------------------------------------------------ our side
class _Images:
    """Stands in for kepo.dataset.QuestionSet: the trainer only asks it for images."""

    def __init__(self, batch: Batch) -> None:
        self._by_id = {
            item.question_id: img for item, img in zip(batch.items, batch.images, strict=True)
        }

    def image(self, question_id: str) -> Image.Image:
        return self._by_id[question_id]


class OurStep:
    """kepo's training step (`kepo.train._optimizer_step`) on an in-memory batch."""

    def __init__(
        self, algorithm: str, student: Path, teacher: Path, args: argparse.Namespace
    ) -> None:
        from kepo.config import load_config
        from kepo.losses import group_advantages
        from kepo.models import completion_token_logprobs, load_policy
        from kepo.train import (
            MICRO_BATCH_LOSS,
            TrainingData,
            TrainRow,
            _Context,
            make_accelerator,
            plan_steps,
        )

        rows_per_step = args.prompts * args.group
        self.cfg = load_config(
            REPO / "configs" / "demo" / f"{algorithm}.yaml",
            overrides={
                "models.student": str(student),
                "models.teacher": str(teacher),
                "models.torch_threads": args.threads,
                "train.learning_rate": args.lr,
                "train.micro_batch_size": rows_per_step,
                "train.grad_accum_steps": 1,
                "train.max_grad_norm": 1.0,
                "train.weight_decay": 0.0,
                "train.adam_betas": [0.9, 0.999],
                "train.mixed_precision": "no",
                "train.gradient_checkpointing": args.gradient_checkpointing,
                "algorithm.clip": True,  # TRL always applies the PPO clip
                "algorithm.kl_coef": 0.0,
                "algorithm.loss_aggregation": "token_mean",
            },
        )
        self.accelerator = make_accelerator(self.cfg)
        model, processor = load_policy(student, dtype="float32", device=self.accelerator.device)
        teacher_model = teacher_processor = None
        if algorithm == "kepo":
            teacher_model, teacher_processor = load_policy(
                teacher, dtype="float32", device=self.accelerator.device
            )
            teacher_model.requires_grad_(False)
        self.batch = make_batch(processor, args)
        b = self.batch
        advantages = group_advantages(
            torch.tensor(b.rewards, dtype=torch.float64),
            torch.tensor([b.prompt_of(i) for i in range(len(b.rewards))]),
            estimator="grpo",
            scale_by_std=True,
        ).tolist()
        # Stored old log-probs: the initial policy's, as the rollout stage would have written.
        from kepo.models import build_sequence_batch

        messages = [
            build_messages(b.items[b.prompt_of(i)], "train", thinking=True)
            for i in range(len(b.completions))
        ]
        images = [b.images[b.prompt_of(i)] for i in range(len(b.completions))]
        with torch.no_grad():
            seq = build_sequence_batch(processor, messages, images, b.completions)
            old, _ = completion_token_logprobs(model, seq)
        self.sequence_width = int(seq["input_ids"].shape[1])
        rows = [
            TrainRow(
                prompt_id=b.items[b.prompt_of(i)].question_id,
                sample_idx=i % b.group,
                completion_ids=tuple(ids),
                advantage=float(advantages[i]),
                gate_open=bool(b.gate_open[i]) and algorithm == "kepo",
                old_logprobs=tuple(old[i, : len(ids)].tolist()),
            )
            for i, ids in enumerate(b.completions)
        ]
        data = TrainingData(rows=rows, items={item.question_id: item for item in b.items})
        model.train()
        if args.gradient_checkpointing:  # as train_iteration does
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8
        )
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.model, self.optimizer = model, optimizer
        self.ctx = _Context(
            self.cfg,
            self.accelerator,
            model,
            processor,
            teacher_model,
            teacher_processor,
            data,
            _Images(b),
        )
        self.plan = plan_steps(
            len(rows),
            passes=1,
            micro_batch_size=rows_per_step,
            grad_accum_steps=1,
            num_processes=1,
            seed=0,
        )[0]
        self.loss_fn = MICRO_BATCH_LOSS[self.cfg.algorithm.spec.loss]
        self.n_open = sum(r.gate_open for r in rows)
        self.last_row: dict[str, Any] = {}
        self.first_row: dict[str, Any] = {}
        self.prep_s = 0.0  # time in _Context.sequences (template, tokenizer, image processor)
        build = self.ctx.sequences

        def timed_sequences(*a: Any, **kw: Any) -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            out = build(*a, **kw)
            self.prep_s += time.perf_counter() - start
            return out

        self.ctx.sequences = timed_sequences  # instance attribute shadows the method

    def __call__(self) -> float:
        from kepo.train import _optimizer_step

        self.prep_s = 0.0
        start, start_cpu = time.perf_counter(), time.process_time()
        self.last_row = _optimizer_step(
            self.ctx,
            self.plan,
            self.loss_fn,
            self.optimizer,
            1.0,
            1.0,
            global_step=0,
            total_steps=1,
            run_id="bench",
            iteration=0,
        )
        elapsed = time.perf_counter() - start
        self.cpu_s = time.process_time() - start_cpu
        if self.last_row["skipped"]:
            raise RuntimeError(f"our step was skipped: {self.last_row['skip_reason']}")
        self.first_row = self.first_row or self.last_row
        return elapsed


# ------------------------------------------------------------------------------ TRL's side
def make_trl_trainer(student: Path, args: argparse.Namespace, callbacks: list) -> Any:
    """A GRPOTrainer whose generation returns the fixed completions of `make_batch`."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from kepo.models import load_policy

    model, processor = load_policy(student, dtype="float32", device="cpu")
    batch = make_batch(processor, args)
    fixed = batch.completions

    class FixedCompletionsGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with `model.generate` replaced by the benchmark's fixed completions."""

        shapes: dict[str, Any] = {}  # noqa: RUF012 - filled per step, read by the benchmark
        prep_s: list[float] = []  # noqa: RUF012 - seconds in _generate_and_score_completions
        first_step: dict[str, float] = {}  # noqa: RUF012 - loss and pre-clip grad norm, step 1

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            type(self).first_step.setdefault("loss", float(loss.detach()))
            return loss

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            type(self).first_step.setdefault("grad_norm", float(norm))
            return norm

        def _generate_single_turn(
            self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
        ):
            return [list(fixed[i % len(fixed)]) for i in range(len(prompt_ids))], None

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            type(self).prep_s.append(time.perf_counter() - start)
            type(self).shapes = {
                "prompt": tuple(out["prompt_ids"].shape),
                "completion": tuple(out["completion_ids"].shape),
                "completion_tokens": int(out["completion_mask"].sum()),
                "has_pixel_values": "pixel_values" in out,
            }
            return out

    rewards = batch.rewards

    def reward_fn(completions: list, **_: Any) -> list[float]:
        return [rewards[i % len(rewards)] for i in range(len(completions))]

    dataset = Dataset.from_list(
        [
            {"prompt": build_messages(item, "train", thinking=True), "image": image}
            for item, image in zip(batch.items, batch.images, strict=True)
        ]
    )
    config = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(prefix="trl_bench_"))),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on; kepo's is off
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        # Prompt order as ours (prompt-major): the fixed completions and rewards are given by
        # row position, so a shuffled prompt order would pair them with other prompts.
        shuffle_dataset=False,
        max_steps=1 + args.repeats,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = FixedCompletionsGRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would clutter the output
    return trainer, FixedCompletionsGRPOTrainer


def _step_callback(on_begin: Any, on_end: Any) -> Any:
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            on_begin()

        def on_step_end(self, args, state, control, **kwargs):
            on_end()

    return StepCallback()


def pad_vocabulary(src: Path, dst: Path, vocab: int) -> Path:
    """A copy of model folder `src` whose embedding and LM head have `vocab` rows (the extra
    ids are never sampled: they only widen the logits, as Qwen3-VL's 151,936 would)."""
    import shutil

    from transformers import AutoModelForImageTextToText

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, dst / path.name)
    model = AutoModelForImageTextToText.from_pretrained(src, local_files_only=True)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(dst)
    return dst


# ------------------------------------------------------------------------------ modes
def time_all(student: Path, teacher: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The alternating timing run (all three sides in this process)."""
    ours = {
        "kepo_grpo": OurStep("grpo", student, teacher, args),
        "kepo_kepo": OurStep("kepo", student, teacher, args),
    }
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu: dict[str, list[float]] = {name: [] for name in SIDES}
    prep: dict[str, list[float]] = {name: [] for name in SIDES}
    clock: dict[str, float] = {}

    def begin() -> None:
        clock["t0"], clock["cpu0"] = time.perf_counter(), time.process_time()

    def end() -> None:
        times["trl_grpo"].append(time.perf_counter() - clock["t0"])
        cpu["trl_grpo"].append(time.process_time() - clock["cpu0"])
        for name, step in ours.items():  # alternation: TRL, ours GRPO, ours KEPO, TRL, ...
            times[name].append(step())
            cpu[name].append(step.cpu_s)
            prep[name].append(step.prep_s)

    trainer, trainer_cls = make_trl_trainer(student, args, [_step_callback(begin, end)])
    trainer.train()
    prep["trl_grpo"] = list(trainer_cls.prep_s)
    timed = {name: values[1:] for name, values in times.items()}  # drop the warm-up step
    if any(len(v) != args.repeats for v in timed.values()):
        raise RuntimeError(f"expected {args.repeats} timed steps per side, got {timed}")
    shapes = trainer_cls.shapes
    rows = args.prompts * args.group
    if shapes["completion_tokens"] != rows * args.tokens or not shapes["has_pixel_values"]:
        raise RuntimeError(f"TRL did not train on the intended batch: {shapes}")
    first = ours["kepo_grpo"].first_row
    return {
        "times": timed,
        "cpu_s": {name: values[1:] for name, values in cpu.items()},
        "same_work": same_work(
            {"loss": first["loss_total"], "grad_norm": first["grad_norm"]}, trainer_cls.first_step
        ),
        "prep_s": {name: values[1:] for name, values in prep.items()},
        "trl_sequence_width": shapes["prompt"][1] + shapes["completion"][1],
        "our_sequence_width": ours["kepo_grpo"].sequence_width,
        "gated_open_rows": ours["kepo_kepo"].n_open,
    }


# Float tolerance of the first-step comparison: fp32 on both sides, the same batch and weights,
# but different operation orders (TRL's log-softmax over materialised logits, ours in chunks).
LOSS_ABS_TOL = 1e-5
GRAD_NORM_REL_TOL = 1e-4


def same_work(ours: dict[str, float], trl: dict[str, float]) -> dict[str, Any]:
    """Both sides' first-step loss and pre-clip gradient norm (same initial weights, same
    batch), and whether they agree within LOSS_ABS_TOL / GRAD_NORM_REL_TOL."""
    if set(trl) != {"loss", "grad_norm"}:
        raise RuntimeError(f"TRL's first step did not report its loss and gradient norm: {trl}")
    loss_ok = abs(ours["loss"] - trl["loss"]) <= LOSS_ABS_TOL
    norm_ok = abs(ours["grad_norm"] - trl["grad_norm"]) <= GRAD_NORM_REL_TOL * abs(trl["grad_norm"])
    return {
        "loss": {"kepo_grpo": ours["loss"], "trl_grpo": trl["loss"]},
        "grad_norm": {"kepo_grpo": ours["grad_norm"], "trl_grpo": trl["grad_norm"]},
        "tolerance": {"loss_abs": f"{LOSS_ABS_TOL:g}", "grad_norm_rel": f"{GRAD_NORM_REL_TOL:g}"},
        "equal": loss_ok and norm_ok,
    }


def measure_memory(
    side: str, student: Path, teacher: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Two steps of `side` in this (fresh) process; the second one is measured: the growth of
    the peak RSS over the RSS just before it (AdamW's state already exists then)."""
    reading: dict[str, float] = {}
    steps = {"begun": 0}

    def begin() -> None:
        steps["begun"] += 1
        if steps["begun"] == 2:
            reading["reset"] = float(reset_peak_rss())
            reading["before"] = rss_mb()

    def end() -> None:
        if steps["begun"] == 2:
            reading["peak"] = peak_rss_mb()

    if side == "trl_grpo":
        args.repeats = 1  # max_steps = 2
        trainer, _ = make_trl_trainer(student, args, [_step_callback(begin, end)])
        trainer.train()
    else:
        step = OurStep(side.removeprefix("kepo_"), student, teacher, args)
        for _ in range(2):
            begin()
            step()
            end()
    if not reading["reset"]:
        raise RuntimeError(
            "the kernel refused to reset VmHWM (/proc/self/clear_refs); cannot measure"
        )
    return {
        "side": side,
        "rss_before_mb": reading["before"],
        "peak_mb": reading["peak"],
        "peak_growth_mb": reading["peak"] - reading["before"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per step (P).")
    parser.add_argument("--group", type=int, default=8, help="Samples per prompt (G).")
    parser.add_argument("--tokens", type=int, default=64, help="Completion tokens per row.")
    parser.add_argument("--image-side", type=int, default=128, help="Image side in pixels.")
    parser.add_argument(
        "--gate-open",
        type=float,
        default=0.25,
        help="Share of each group that is gated open (KEPO).",
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (the demo's).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="A `kepo demo` workdir whose warmed-up models to use.",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="Widen both models' vocabulary (embedding + LM head) to this size, e.g. 151936.",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Activation checkpointing on BOTH sides (TRL's default; kepo's default is off).",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="Skip the per-side memory subprocesses."
    )
    parser.add_argument("--memory-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads_note = set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()

    if args.memory_side:
        emit_json(MEMORY_PREFIX, measure_memory(args.memory_side, args.student, args.teacher, args))
        return

    import trl

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, models_note = tiny_pair(Path(tmp) / "models", args.workdir)
        if args.vocab:
            student = pad_vocabulary(student, Path(tmp) / "wide" / "student", args.vocab)
            teacher = pad_vocabulary(teacher, Path(tmp) / "wide" / "teacher", args.vocab)
            models_note += f", vocabulary widened to {args.vocab}"
        result = time_all(student, teacher, args)
        memory: dict[str, dict] = {}
        if not args.no_memory:
            common = [
                "--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens),
                "--image-side", str(args.image_side), "--gate-open", str(args.gate_open), "--lr", str(args.lr),
                "--threads", str(args.threads), "--student", str(student), "--teacher", str(teacher),
            ]  # fmt: skip
            if args.gradient_checkpointing:
                common.append("--gradient-checkpointing")
            for side in SIDES:
                memory[side] = run_json_subprocess(
                    [str(Path(__file__).resolve()), "--memory-side", side, *common],
                    MEMORY_PREFIX,
                    env=MEMORY_ENV,
                )

    med = medians(result["times"])
    cpu_med = medians(result["cpu_s"])
    prep_med = medians(result["prep_s"])
    rows = args.prompts * args.group
    print(
        f"{args.prompts} prompts x G={args.group} = {rows} rows, {args.tokens} completion tokens each, "
        f"one {args.image_side}px image per prompt; fp32, AdamW lr {args.lr}; activation "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'} on both sides; {models_note}"
    )
    print(
        f"sequence width (prompt + completion): ours {result['our_sequence_width']}, "
        f"TRL {result['trl_sequence_width']}; KEPO gated-open rows: {result['gated_open_rows']}/{rows}"
    )
    print(f"cpu, {threads_note}; trl {trl.__version__}, torch {torch.__version__}")
    print(f"{args.repeats} alternating repeats after 1 warm-up step each; medians")
    work = result["same_work"]
    print(
        "same work, first step (same weights, same batch): loss kepo_grpo "
        f"{work['loss']['kepo_grpo']:.8f} / trl_grpo {work['loss']['trl_grpo']:.8f}; pre-clip "
        f"grad norm {work['grad_norm']['kepo_grpo']:.6f} / {work['grad_norm']['trl_grpo']:.6f} "
        f"-> {'EQUAL' if work['equal'] else 'DIFFERENT'} within |d loss| <= {LOSS_ABS_TOL:g}, "
        f"rel. d grad norm <= {GRAD_NORM_REL_TOL:g}"
    )
    table = []
    for side in SIDES:
        mem = memory.get(side, {})
        table.append(
            [
                side,
                med[side],
                rows * args.tokens / med[side],
                prep_med[side],
                med[side] / med["trl_grpo"],
                cpu_med[side],
                cpu_med[side] / cpu_med["trl_grpo"],
                mem.get("peak_growth_mb", math.nan),
            ]
        )
    print_table(
        [
            "side",
            "median s/step",
            "compl. tok/s",
            "of it: batch prep s",
            "x TRL time",
            "CPU s/step",
            "x TRL CPU",
            "peak RSS growth MiB",
        ],
        table,
    )
    print(
        "batch prep = kepo: build_sequence_batch for student (and teacher); TRL: "
        "_generate_and_score_completions (prompt template/tokenizer/image processor twice, rewards, "
        "advantages; generation replaced by the fixed completions)"
    )
    ratio = {
        "grpo_time": med["kepo_grpo"] / med["trl_grpo"],
        "kepo_time": med["kepo_kepo"] / med["trl_grpo"],
        "grpo_cpu": cpu_med["kepo_grpo"] / cpu_med["trl_grpo"],
        "kepo_cpu": cpu_med["kepo_kepo"] / cpu_med["trl_grpo"],
    }
    if memory:
        ratio["grpo_memory"] = (
            memory["kepo_grpo"]["peak_growth_mb"] / memory["trl_grpo"]["peak_growth_mb"]
        )
        ratio["kepo_memory"] = (
            memory["kepo_kepo"]["peak_growth_mb"] / memory["trl_grpo"]["peak_growth_mb"]
        )
    emit_json(
        PREFIX,
        {
            "prompts": args.prompts,
            "group": args.group,
            "tokens": args.tokens,
            "image_side": args.image_side,
            "gradient_checkpointing": args.gradient_checkpointing,
            "vocab": args.vocab,
            "repeats": args.repeats,
            "threads": args.threads,
            "models": models_note,
            "gated_open_rows": result["gated_open_rows"],
            "median_s": med,
            "median_cpu_s": cpu_med,
            "same_work": result["same_work"],
            "median_prep_s": prep_med,
            "all_s": result["times"],
            "peak_rss_growth_mb": {k: v["peak_growth_mb"] for k, v in memory.items()},
            "ratio_ours_over_trl": ratio,
            "trl_version": trl.__version__,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
