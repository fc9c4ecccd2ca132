"""GPU benchmark: one training step and Hugging Face generate on a Qwen3-VL-2B-shaped model.

The model is built from a Qwen3-VL-2B-Instruct-shaped config with random weights (nothing is
downloaded). Two measurements:

1. one GRPO training step (forward, kepo.losses policy term over the completion tokens, backward,
   AdamW) on G trajectories of `--completion-tokens` tokens, each with a 384x384 image
   (144 image tokens): tokens/s and model FLOPs utilisation (6 * N * tokens / time / peak);
2. Hugging Face `generate` throughput for `--prompts` prompts x `--samples` samples.

    python benchmarks/gpu_step.py                 # on a GPU machine (bf16)
    python benchmarks/gpu_step.py --preset tiny   # a CPU smoke run of the same code

Prints a short table last and one JSON line (prefix `gpu_step `).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from kepo.losses import aggregate, policy_loss, token_logprobs

# Qwen3-VL-2B-Instruct's published architecture (2.13 B parameters).
PRESETS = {
    "2b": {
        "text": dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        "vision": dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        "image_side": 384,
    },
    "tiny": {
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [8, 4, 4],
                "mrope_interleaved": True,
            },
        ),
        "vision": dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        "image_side": 64,
    },
}

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(preset: str, dtype: torch.dtype, device: str) -> Qwen3VLForConditionalGeneration:
    spec = PRESETS[preset]
    config = Qwen3VLConfig(
        text_config=spec["text"],
        vision_config=spec["vision"],
        tie_word_embeddings=spec["text"]["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    return model.to(dtype)


def image_inputs(model, n_images: int, side: int, device: str, dtype: torch.dtype) -> dict:
    vc = model.config.vision_config
    grid = side // vc.patch_size  # patches per side
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    pixel_values = torch.randn(n_images * grid * grid, patch_dim, device=device, dtype=dtype)
    grid_thw = torch.tensor([[1, grid, grid]] * n_images, device=device)
    n_image_tokens = grid * grid // vc.spatial_merge_size**2
    return {"pixel_values": pixel_values, "image_grid_thw": grid_thw}, n_image_tokens


def prompt_ids(
    model, n: int, n_image_tokens: int, text_tokens: int, device: str, gen: torch.Generator
) -> torch.Tensor:
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    rows = []
    for _ in range(n):
        text = torch.randint(0, 150_000, (text_tokens,), generator=gen)
        rows.append(
            torch.cat(
                [
                    text[: text_tokens // 2],
                    torch.tensor([cfg.vision_start_token_id]),
                    torch.full((n_image_tokens,), cfg.image_token_id),
                    torch.tensor([cfg.vision_end_token_id]),
                    text[text_tokens // 2 :],
                ]
            )
        )
    ids = torch.stack(rows).to(device)
    assert int(ids.max()) < vocab
    return ids


def mm_token_type_ids(model, ids: torch.Tensor) -> torch.Tensor:
    return (ids == model.config.image_token_id).long()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_bench(model, args, device: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    G, Tc = args.group, args.completion_tokens
    img, n_img_tok = image_inputs(model, G, PRESETS[args.preset]["image_side"], device, dtype)
    prompt = prompt_ids(model, G, n_img_tok, args.prompt_text_tokens, device, gen)
    completion = torch.randint(0, 150_000, (G, Tc), generator=gen).to(device)
    input_ids = torch.cat([prompt, completion], dim=1)  # (G, L)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.ones(G, Tc, device=device)  # (G, Tc) completion tokens
    advantages = torch.randn(G, generator=gen).to(device)
    old_logprobs = None
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for step in range(args.warmup_steps + args.steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids(model, input_ids),
            **img,
        )
        logits = out.logits[
            :, prompt.shape[1] - 1 : -1
        ].float()  # (G, Tc, V) predicts each completion token
        logprobs = token_logprobs(logits, completion)  # (G, Tc)
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        loss_tok, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip=True)
        loss = aggregate(loss_tok, mask, "token_mean")
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        del out, logits, logprobs, loss_tok, loss
        sync(device)
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = int(input_ids.numel())
    step_s = sorted(times)[len(times) // 2]
    flops = 6 * n_params * tokens
    return {
        "step_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "n_params": n_params,
        "achieved_tflops": flops / step_s / 1e12,
    }


@torch.no_grad()
def generate_bench(model, args, device: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    model.eval()
    n_prompts, n_samples = args.prompts, args.samples
    img, n_img_tok = image_inputs(
        model, n_prompts, PRESETS[args.preset]["image_side"], device, dtype
    )
    ids = prompt_ids(model, n_prompts, n_img_tok, args.prompt_text_tokens, device, gen)
    cfg = model.config
    suppress = [
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    ]
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=mm_token_type_ids(model, ids),
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        num_return_sequences=n_samples,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        suppress_tokens=suppress,
        pad_token_id=0,
        **img,
    )
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(**kwargs)
    sync(device)
    elapsed = time.perf_counter() - t0
    generated = int((out.shape[1] - ids.shape[1]) * out.shape[0])
    return {
        "generate_s": elapsed,
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / elapsed,
        "sequences": int(out.shape[0]),
        "ms_per_decode_step": 1000 * elapsed / args.new_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="2b")
    p.add_argument("--group", type=int, default=8, help="trajectories G in the training step")
    p.add_argument("--completion-tokens", type=int, default=1024)
    p.add_argument("--prompt-text-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--skip-generate", action="store_true")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    gen = torch.Generator().manual_seed(0)
    t_build = time.perf_counter()
    model = build_model(args.preset, dtype, device)
    build_s = time.perf_counter() - t_build

    train = train_step_bench(model, args, device, dtype, gen)
    train["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    train["mfu"] = train["achieved_tflops"] * 1e12 / peak if peak else None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen_res = {} if args.skip_generate else generate_bench(model, args, device, dtype, gen)
    if gen_res and device == "cuda":
        gen_res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    result = {
        "device": gpu,
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "build_s": build_s,
        "train": train,
        "generate": gen_res,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print("gpu_step " + json.dumps(result))
    print()
    print(f"{'device':<28}{gpu}  ({result['dtype']}, {train['n_params'] / 1e9:.2f} B params)")
    print(
        f"{'train step':<28}{train['step_s']:.3f} s for {args.group} x {train['tokens_per_step'] // args.group} tokens"
    )
    print(f"{'train tokens/s':<28}{train['tokens_per_s']:,.0f}")
    mfu = f"{train['mfu'] * 100:.1f} %" if train["mfu"] is not None else "n/a (no known peak)"
    print(
        f"{'model FLOPs utilisation':<28}{mfu}  ({train['achieved_tflops']:.1f} TFLOP/s by 6*N*tokens)"
    )
    if train["peak_mem_gib"] is not None:
        print(f"{'train peak memory':<28}{train['peak_mem_gib']:.1f} GiB")
    if gen_res:
        print(
            f"{'generate':<28}{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens in {gen_res['generate_s']:.1f} s"
        )
        print(
            f"{'generated tokens/s':<28}{gen_res['generated_tokens_per_s']:,.0f}  ({gen_res['ms_per_decode_step']:.1f} ms per decode step)"
        )


if __name__ == "__main__":
    main()
