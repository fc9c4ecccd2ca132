"""Rollout generation: the batched Hugging Face backend vs a per-sample loop, and vs TRL's
generation path; generated tokens per second.

The first two sides run the same `HFBackend.generate` code on the same requests and seeds; only
`generation_batch_size` differs: the batched side packs all prompts x samples into calls of up
to 128 rows (one call here), the loop side uses 1, i.e. one `model.generate` call per sample,
the way a naive rollout loop would. Stop tokens are suppressed (`min_new_tokens =
max_new_tokens`) so every sample has exactly `--tokens` tokens on every side.

The third side, `trl_generate`, is TRL's own generation path driven alone:
`GRPOTrainer._generate(prompts)` of a trainer built on the same model folder (its own copy of
the weights), with every prompt repeated G times as TRL's sampler feeds them. It is what a TRL
rollout does before scoring: chat template + tokenizer + image processor for every row, ONE
`model.generate` over all P x G rows (TRL's transformers path; temperature 0.9, top-p 0.95, and
`min_new_tokens` = `max_new_tokens` plus the vision tokens suppressed through
`generation_kwargs`, so the work matches), and decoding. TRL gets no per-token log-probs from
this path (it recomputes them with a forward pass when it needs them); our backend records them
while sampling and draws each row from its own seeded generator. `--no-trl` leaves it out.

The sides alternate, `--repeats` times each after one untimed warm-up, and the medians are reported,
wall-clock (the figure that matters) and this process's CPU seconds (less sensitive to other
processes on a shared machine). On CPU the default is one torch thread: with two threads on
cores shared with other processes, OpenMP threads wait on each other at every tiny operator and
every side runs 8-25x slower, the per-sample loop most.

    python benchmarks/hf_generate.py                    # builds a tiny student in a temp dir
    python benchmarks/hf_generate.py --no-trl            # without TRL (no trl needed)
    python benchmarks/hf_generate.py --no-loop           # batched vs TRL only (quicker)
    python benchmarks/hf_generate.py --model DIR --device cuda --dtype bfloat16

Prints a short table and one JSON line (prefix `hf_generate `).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kepo.generation import GenerationRequest, SamplingParams
from kepo.generation.hf import HFBackend
from kepo.prompts import PromptItem, build_messages

QUESTIONS = [
    ("What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound")),
    ("Which organ is enlarged in this image?", ("Liver", "Kidney", "Spleen")),
    ("Grade the lesion.", ("Mild", "Moderate", "Severe")),
    ("Where is the nodule located?", ("Left lung", "Right lung")),
]


def make_requests(n_prompts: int, image_side: int) -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    requests = []
    for i in range(n_prompts):
        question, options = QUESTIONS[i % len(QUESTIONS)]
        item = PromptItem(f"q{i}", f"{question} (case {i})", options, "A")
        image = Image.fromarray((rng.random((image_side, image_side, 3)) * 255).astype("uint8"))
        requests.append(
            GenerationRequest(item.question_id, build_messages(item, "train"), image, 1000 + i)
        )
    return requests


def timed(backend: HFBackend, requests, sampling: SamplingParams) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, generated tokens) of one generate call."""
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    results = backend.generate(requests, sampling, desc="bench")
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return elapsed, cpu, sum(len(c.token_ids) for r in results for c in r)


class TRLGeneration:
    """TRL's generation path (`GRPOTrainer._generate`) on a model folder, driven alone."""

    def __init__(self, model_dir: Path, requests, args: argparse.Namespace, work_dir: Path) -> None:
        import transformers
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
        from trl.data_utils import prepare_multimodal_messages

        from kepo.models import load_policy, vision_token_ids

        transformers.logging.set_verbosity_error()
        model, processor = load_policy(model_dir, dtype=args.dtype, device=args.device)
        config = GRPOConfig(
            output_dir=str(work_dir / "trl"),
            use_cpu=args.device == "cpu",
            bf16=args.dtype == "bfloat16",
            per_device_train_batch_size=args.prompts * args.samples,
            num_generations=args.samples,
            max_completion_length=args.tokens,
            temperature=0.9,
            top_p=0.95,
            generation_kwargs={
                "min_new_tokens": args.tokens,
                "suppress_tokens": vision_token_ids(processor),
            },
            report_to="none",
            disable_tqdm=True,
        )
        first = requests[0]
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=config,
            train_dataset=Dataset.from_list([{"prompt": first.messages, "image": first.image}]),
            processing_class=processor,
        )
        # As TRL's RepeatSampler feeds them: each prompt G times in a row, its image attached.
        self.prompts = [
            prepare_multimodal_messages(list(r.messages), images=[r.image])
            for r in requests
            for _ in range(args.samples)
        ]
        self.device = torch.device(args.device)

    def timed(self, prompts) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds, generated tokens) of one `_generate` call."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        completion_ids = self.trainer._generate(prompts)[1]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        return elapsed, cpu, sum(len(ids) for ids in completion_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="Model folder (default: build a tiny student)."
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch", type=int, default=128, help="generation_batch_size of the batched side."
    )
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: robust on shared cores)."
    )
    parser.add_argument(
        "--no-trl", action="store_true", help="Leave out TRL's generation path (no trl needed)."
    )
    parser.add_argument(
        "--no-loop", action="store_true", help="Leave out the (slow) per-sample loop side."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from kepo.tiny import build_tiny

            model_dir = build_tiny(Path(tmp) / "student", "student", seed=0)
        batched = HFBackend.from_pretrained(
            model_dir, dtype=args.dtype, device=args.device, generation_batch_size=args.batch
        )
        # The loop side shares the batched side's model: only the batch size differs.
        loop = HFBackend(
            batched.model, batched.processor, generation_batch_size=1, dtype=args.dtype
        )
        requests = make_requests(args.prompts, args.image_side)
        sampling = SamplingParams(
            n=args.samples,
            temperature=0.9,
            top_p=0.95,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
        )
        expected = args.prompts * args.samples * args.tokens
        sides = {"batched": lambda: timed(batched, requests, sampling)}
        timed(batched, requests[:2], sampling)  # warm-up (first-call costs), untimed
        if not args.no_loop:
            sides["per_sample_loop"] = lambda: timed(loop, requests, sampling)
            timed(loop, requests[:1], SamplingParams(n=1, max_new_tokens=4))
        if not args.no_trl:
            trl_side = TRLGeneration(model_dir, requests, args, Path(tmp))
            sides["trl_generate"] = lambda: trl_side.timed(trl_side.prompts)
            trl_side.timed(trl_side.prompts[: 2 * args.samples])  # warm-up, untimed
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu_times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():  # alternating: batched, loop, TRL, batched, ...
                elapsed, cpu, tokens = side()
                if tokens != expected:
                    raise RuntimeError(f"{name} generated {tokens} tokens, expected {expected}")
                times[name].append(elapsed)
                cpu_times[name].append(cpu)

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    rates = {name: expected / seconds for name, seconds in medians.items()}
    ratio = rates["batched"] / rates["per_sample_loop"] if "per_sample_loop" in rates else None
    ratio_trl = rates["batched"] / rates["trl_generate"] if "trl_generate" in rates else None
    ratio_trl_cpu = (
        cpu_medians["trl_generate"] / cpu_medians["batched"] if "trl_generate" in rates else None
    )
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({args.threads} threads)"
    )
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens = {expected} tokens, "
        f"{args.repeats} repeats (medians), {device}, {args.dtype}"
    )
    print(f"{'side':<18}{'median s':>10}{'tokens/s':>12}{'CPU s':>10}")
    for name in times:
        print(f"{name:<18}{medians[name]:>10.3f}{rates[name]:>12.1f}{cpu_medians[name]:>10.3f}")
    if ratio is not None:
        print(f"speed-up of batching: {ratio:.1f}x")
    if ratio_trl is not None:
        print(
            f"batched backend / TRL generation path, tokens/s: {ratio_trl:.2f}x wall-clock, "
            f"{ratio_trl_cpu:.2f}x by CPU seconds"
        )
    print(
        "hf_generate "
        + json.dumps(
            {
                "prompts": args.prompts,
                "samples": args.samples,
                "tokens": args.tokens,
                "repeats": args.repeats,
                "device": device,
                "dtype": args.dtype,
                "batch": args.batch,
                "median_s": {k: round(v, 4) for k, v in medians.items()},
                "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
                "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
                "cpu_median_s": {k: round(v, 4) for k, v in cpu_medians.items()},
                "ratio": None if ratio is None else round(ratio, 2),
                "ratio_batched_over_trl": None if ratio_trl is None else round(ratio_trl, 2),
                "ratio_batched_over_trl_cpu": None
                if ratio_trl_cpu is None
                else round(ratio_trl_cpu, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
