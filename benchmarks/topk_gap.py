"""Gap between top-k (offline, stored teacher top-k + tail bucket) and full-vocabulary
distillation losses, for k = 8, 32, 128 and the three divergences of kepo.losses.

    python benchmarks/topk_gap.py                              # synthetic logits (default)
    python benchmarks/topk_gap.py --tiny                       # freshly built tiny models
    python benchmarks/topk_gap.py --student DIR --teacher DIR  # any two local model folders

Synthetic mode: V = 4096, T = 64 positions. Student logits are a Zipf-like prior plus Gaussian
spread plus one strongly preferred token per position (a peaked next-token distribution);
teacher logits = student logits + Gaussian noise (`--noise`), which puts the full divergences
at O(0.1–1). Prints a table and one JSON line (`topk_gap ` prefix) with every figure.
Reported per divergence and k: mean full loss, mean top-k loss, mean per-token |top-k − full|
(absolute and relative to the full mean), and the cosine between the two losses' gradients
with respect to the student logits (what distillation actually follows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kepo.losses import full_divergence, topk_divergence

KINDS = {"forward_kl": "forward KL", "reverse_kl": "reverse KL", "jsd": "JSD(0.5)"}


def synthetic_logits(
    *, vocab: int, tokens: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, V) student and teacher logits with a realistic, peaked teacher distribution."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(vocab, generator=g).float() + 1.0
    prior = -1.2 * torch.log(rank)  # (V,) Zipf-like unigram preference
    student = prior + 3.0 * torch.randn(tokens, vocab, generator=g)  # (T, V)
    preferred = torch.randint(0, vocab, (tokens,), generator=g)
    boost = 6.0 + 16.0 * torch.rand(tokens, generator=g)  # how sure each position is
    student[torch.arange(tokens), preferred] += boost
    teacher = student + noise * torch.randn(tokens, vocab, generator=g)  # (T, V)
    return student[None], teacher[None]


def model_logits(
    student_dir: Path, teacher_dir: Path, *, tokens: int, seed: int, sequences: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) student and teacher completion logits on the same sampled sequences.

    B = `sequences` training prompts (kepo.prompts, thinking mode) with a random 64x64 image
    each; the student samples `tokens` completion tokens per prompt at temperature 1 (stop
    tokens suppressed until then, through kepo.generation's HF backend); both models then score
    prompt + completion (kepo.models.build_sequence_batch / completion_logits, each model with
    its own processor), and the logits are cut to the shared vocabulary.
    """
    import numpy as np
    from PIL import Image

    from kepo.generation import GenerationRequest, SamplingParams, make_backend
    from kepo.models import (
        assert_shared_vocabulary,
        build_sequence_batch,
        completion_logits,
        load_policy,
    )
    from kepo.prompts import PromptItem, build_messages

    rng = np.random.default_rng(seed)
    findings = ["mass", "cyst", "edema", "hemorrhage", "infarct", "normal"]
    items = [
        PromptItem(
            f"q{i}",
            f"Which finding is shown in this MRI scan? ({i})",
            tuple(findings[i % 3 : i % 3 + 4]),
            "A",
        )
        for i in range(sequences)
    ]
    messages = [build_messages(item, "train", thinking=True) for item in items]
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in items]
    backend = make_backend("hf", student_dir, dtype="float32", device="cpu")
    requests = [
        GenerationRequest(f"r{i}", m, img, seed + i)
        for i, (m, img) in enumerate(zip(messages, images, strict=True))
    ]
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens)
    completions = [
        samples[0].token_ids for samples in backend.generate(requests, sampling, desc="sampling")
    ]
    backend.close()

    logits = []
    processors = []
    for folder in (student_dir, teacher_dir):
        model, processor = load_policy(folder)
        processors.append(processor)
        batch = build_sequence_batch(processor, messages, images, completions)
        with torch.no_grad():
            logits.append(completion_logits(model, batch).float())  # (B, T, V)
    assert_shared_vocabulary(*processors)
    vocab = min(x.shape[-1] for x in logits)
    student, teacher = (x[..., :vocab] for x in logits)
    return student, teacher


def tiny_pair(seed: int) -> tuple[Path, Path]:
    """Build the tiny student/teacher pair (kepo.tiny) in a temporary folder."""
    import tempfile

    from kepo.tiny import build_tiny_pair

    return build_tiny_pair(Path(tempfile.mkdtemp(prefix="topk_gap_")), seed=seed)


def teacher_stats(teacher: torch.Tensor, ks: list[int]) -> dict[str, float]:
    probs = teacher.float().softmax(-1)  # (B, T, V)
    entropy = -(probs * probs.clamp_min(1e-38).log()).sum(-1).mean().item()
    top = probs.sort(-1, descending=True).values
    stats = {"entropy_nats": entropy, "top1_mass": top[..., 0].mean().item()}
    for k in ks:
        stats[f"top{k}_mass"] = top[..., :k].sum(-1).mean().item()
    return stats


def measure(student: torch.Tensor, teacher: torch.Tensor, ks: list[int]) -> list[dict]:
    teacher_logp = torch.log_softmax(teacher.float(), dim=-1)  # (B, T, V)
    rows = []
    for kind in KINDS:
        s = student.float().clone().requires_grad_(True)
        full = full_divergence(s, teacher, kind=kind, beta=0.5)  # (B, T)
        (grad_full,) = torch.autograd.grad(full.sum(), s)
        for k in ks:
            values, ids = teacher_logp.topk(k, dim=-1)  # (B, T, k): what the rollout stores
            approx = topk_divergence(s, ids, values, kind=kind, beta=0.5)  # (B, T)
            (grad_k,) = torch.autograd.grad(approx.sum(), s)
            gap = (approx - full).abs().detach()  # (B, T)
            cos = torch.nn.functional.cosine_similarity(
                grad_k.flatten(), grad_full.flatten(), dim=0
            ).item()
            full_mean = full.mean().item()
            rows.append(
                {
                    "divergence": kind,
                    "k": k,
                    "full": full_mean,
                    "topk": approx.mean().item(),
                    "abs_gap": gap.mean().item(),
                    "rel_gap": gap.mean().item() / full_mean if full_mean > 0 else float("nan"),
                    "grad_cosine": cos,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, help="saved student model folder (optional)")
    parser.add_argument("--teacher", type=Path, help="saved teacher model folder (optional)")
    parser.add_argument(
        "--tiny", action="store_true", help="build the tiny pair (kepo.tiny) and use it"
    )
    parser.add_argument("--sequences", type=int, default=4, help="sampled sequences (model mode)")
    parser.add_argument("--vocab", type=int, default=4096, help="synthetic vocabulary size")
    parser.add_argument("--tokens", type=int, default=64, help="positions per sequence")
    parser.add_argument("--noise", type=float, default=1.5, help="synthetic teacher-student noise")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    if (args.student is None) != (args.teacher is None):
        parser.error("give both --student and --teacher, or neither (synthetic logits)")
    if args.tiny:
        if args.student is not None:
            parser.error("--tiny builds its own models; drop --student/--teacher")
        args.student, args.teacher = tiny_pair(args.seed)
    if args.student is not None:
        student, teacher = model_logits(
            args.student, args.teacher, tokens=args.tokens, seed=args.seed, sequences=args.sequences
        )
        source = "tiny models" if args.tiny else "models"
    else:
        student, teacher = synthetic_logits(
            vocab=args.vocab, tokens=args.tokens, noise=args.noise, seed=args.seed
        )
        source = "synthetic"
    vocab = student.shape[-1]
    if max(args.ks) > vocab:
        parser.error(f"k={max(args.ks)} exceeds the vocabulary ({vocab})")

    stats = teacher_stats(teacher, args.ks)
    rows = measure(student, teacher, args.ks)

    print(f"source={source}  V={vocab}  positions={student.shape[0] * student.shape[1]}")
    print("teacher: " + "  ".join(f"{k}={v:.3f}" for k, v in stats.items()))
    header = f"{'divergence':<11} {'k':>4} {'full':>8} {'top-k':>8} {'|gap|':>9} {'rel':>7} {'grad cos':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{KINDS[r['divergence']]:<11} {r['k']:>4} {r['full']:>8.4f} {r['topk']:>8.4f} "
            f"{r['abs_gap']:>9.4f} {r['rel_gap']:>7.1%} {r['grad_cosine']:>9.4f}"
        )
    record = {"source": source, "vocab": vocab, "teacher": stats, "rows": rows}
    print("topk_gap " + json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
