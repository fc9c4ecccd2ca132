"""One seed derivation for every stage (rollout, sampling, evaluation, vLLM)."""

from __future__ import annotations

import hashlib

import kepo.generation.base as generation_base
import kepo.run as run_module
from kepo.seeds import derive_seed


def test_every_stage_uses_the_same_derivation() -> None:
    assert generation_base.derive_seed is derive_seed
    assert run_module.derive_seed is derive_seed


def test_derive_seed_matches_a_hand_computed_digest() -> None:
    digest = hashlib.sha256(b"7\x1frun-a\x1frollout\x1f3").digest()
    expected = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    assert derive_seed(7, "run-a", "rollout", 3) == expected
    assert 0 <= derive_seed("x") < 2**63
    assert derive_seed(1, 2) != derive_seed(12)  # parts are separated, not concatenated
