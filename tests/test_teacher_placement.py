"""Teacher placement: a teacher split by device_map scores exactly like the plain load.

On the CPU accelerate's dispatch is exercised with an explicit map that offloads half the
decoder layers to disk (its hooks load them for each forward pass), and with device_map='auto'
capped by max_memory={'cpu': ...}.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from kepo.config import ConfigError, ModelsConfig, load_config
from kepo.models import (
    build_sequence_batch,
    completion_token_logprobs,
    input_device,
    load_model,
    load_policy,
    normalize_max_memory,
    placement_summary,
    teacher_placement,
)


@pytest.fixture(scope="module")
def teacher_and_batch(tiny_models):
    teacher_dir = tiny_models[1]
    model, processor = load_policy(teacher_dir)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x?"}]}]]
    images = [Image.new("RGB", (32, 32), (120, 60, 30)), Image.new("RGB", (32, 32), (10, 200, 90))]
    batch = build_sequence_batch(processor, messages * 2, images, [[5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        reference, mask = completion_token_logprobs(model, batch)
    assert mask.sum() == 6
    return teacher_dir, batch, reference


def half_on_disk_map(teacher_dir) -> dict[str, str]:
    n_layers = json.loads((teacher_dir / "config.json").read_text())["text_config"][
        "num_hidden_layers"
    ]
    device_map = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    for i in range(n_layers):
        device_map[f"model.language_model.layers.{i}"] = "cpu" if i < n_layers // 2 else "disk"
    return device_map


def test_explicit_map_with_disk_offload_scores_like_the_plain_load(
    teacher_and_batch, tmp_path
) -> None:
    teacher_dir, batch, reference = teacher_and_batch
    device_map = half_on_disk_map(teacher_dir)
    model = load_model(teacher_dir, device_map=device_map, offload_folder=tmp_path / "offload")
    placed = placement_summary(model)
    assert set(placed) == {"cpu", "disk"} and placed["disk"] > 0  # really split
    assert sum(placed.values()) == sum(p.numel() for p in load_model(teacher_dir).parameters())
    assert input_device(model) == torch.device("cpu")
    with torch.no_grad():
        logprobs, _ = completion_token_logprobs(model, batch)
    torch.testing.assert_close(logprobs, reference, atol=1e-6, rtol=0)


def test_auto_map_with_a_memory_cap_scores_like_the_plain_load(teacher_and_batch) -> None:
    teacher_dir, batch, reference = teacher_and_batch
    kwargs = teacher_placement(
        ModelsConfig(teacher_device_map="auto", teacher_max_memory={"cpu": "2GiB"})
    )
    assert kwargs == {"device_map": "auto", "max_memory": {"cpu": "2GiB"}}
    model = load_model(teacher_dir, **kwargs)
    assert set(placement_summary(model)) == {"cpu"}
    with torch.no_grad():
        logprobs, _ = completion_token_logprobs(model, batch)
    torch.testing.assert_close(logprobs, reference, atol=1e-6, rtol=0)


def test_a_map_that_misses_modules_is_a_one_line_error(teacher_and_batch, tmp_path) -> None:
    teacher_dir, _, _ = teacher_and_batch
    with pytest.raises(ValueError, match=r"could not place the model.*Fix: map every") as err:
        load_model(
            teacher_dir,
            device_map={"model.visual": "cpu", "lm_head": "disk"},
            offload_folder=tmp_path / "offload",
        )
    assert "\n" not in str(err.value)


def test_placement_settings() -> None:
    assert teacher_placement(ModelsConfig()) == {}
    assert normalize_max_memory({"0": "40GiB", 1: "40GiB", "cuda:2": "10GiB", "cpu": "64GiB"}) == {
        0: "40GiB",
        1: "40GiB",
        2: "10GiB",
        "cpu": "64GiB",
    }
    with pytest.raises(ValueError, match="not a device"):
        normalize_max_memory({"gpu0": "1GiB"})
    with pytest.raises(ValueError, match="not a strategy"):
        teacher_placement(ModelsConfig(teacher_device_map="everywhere"))
    with pytest.raises(ValueError, match="needs a device_map"):
        load_model("unused", max_memory={"cpu": "1GiB"})


def test_max_memory_without_device_map_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  teacher_max_memory: {0: 40GiB}\n")
    with pytest.raises(ConfigError, match="teacher_device_map: auto"):
        load_config(path)


def test_rollout_loads_the_teacher_as_placed_and_the_student_whole(
    teacher_and_batch, tiny_models, curated_bundled, tmp_path
) -> None:
    from test_flows import write_config

    from kepo.rollout import _make_backend
    from kepo.run import Run

    teacher_dir, batch, reference = teacher_and_batch
    config = write_config(
        tmp_path,
        curated_bundled,
        tiny_models,
        **{
            "models.teacher_device_map": half_on_disk_map(teacher_dir),
            "models.teacher_offload_folder": str(tmp_path / "offload"),
        },
    )
    run = Run.create(load_config(config))
    teacher = _make_backend(run, teacher_dir, role="teacher")
    student = _make_backend(run, tiny_models[0], role="student")
    try:
        assert placement_summary(teacher.model)["disk"] > 0
        assert set(placement_summary(student.model)) == {"cpu"}
        with torch.no_grad():
            logprobs, _ = completion_token_logprobs(teacher.model, batch)
        torch.testing.assert_close(logprobs, reference, atol=1e-6, rtol=0)
    finally:
        teacher.close()
        student.close()
