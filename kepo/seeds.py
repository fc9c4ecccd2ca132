"""The one seed derivation every stage uses.

A seed is a SHA-256 digest of its printable parts (master seed, run id, stage, iteration,
prompt id, sample index…), read as a big-endian integer and cut to 63 bits, so it is the same
in every process, on every machine and whatever the batching.
"""

from __future__ import annotations

import hashlib

SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts.

    e.g. ``derive_seed(run_seed, run_id, "rollout", iteration, prompt_id)``.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK
