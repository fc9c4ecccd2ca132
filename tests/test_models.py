"""Tiny-model kit, model/processor loading, and the shared prompt+completion tensor layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kepo.models import (
    assert_shared_vocabulary,
    build_prompt_inputs,
    build_sequence_batch,
    check_processor,
    completion_logits,
    completion_token_logprobs,
    load_policy,
    load_processor,
    model_inputs,
    resolve_device,
    resolve_dtype,
    vision_token_ids,
)
from kepo.prompts import PromptItem, build_messages
from kepo.tiny import PRESETS, SPECIAL_TOKENS, TAG_TOKENS, build_tiny

ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
    PromptItem("q3", "Grade the lesion.", ("Mild", "Moderate", "Severe"), "C"),
]


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def student(tiny_models):
    return load_policy(tiny_models[0])


# ------------------------------------------------------------------------------ kit
def test_build_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny(tmp_path / "a", "student", seed=3)
    b = build_tiny(tmp_path / "b", "student", seed=3)
    c = build_tiny(tmp_path / "c", "student", seed=4, tokenizer_from=a)
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "preprocessor_config.json",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_learns_the_dataset_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kepo.tiny import corpus_from_parquet

    rows = {
        "question_id": ["a", "b"],
        "question": ["Is there pneumatosis intestinalis?", "Where is the pneumatosis?"],
        "options": [["Yes", "No"], ["Colon", "Stomach"]],
        "rationale": ["Gas in the bowel wall means pneumatosis.", None],
    }
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table(rows), path)
    texts = corpus_from_parquet([path])
    assert "Colon" in texts and "Gas in the bowel wall means pneumatosis." in texts
    folder = build_tiny(tmp_path / "m", "student", corpus_texts=texts * 20)
    tokenizer = load_processor(folder).tokenizer
    assert len(tokenizer(" pneumatosis", add_special_tokens=False)["input_ids"]) == 1
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet has none of the columns"):
        corpus_from_parquet([tmp_path / "bad.parquet"])


def test_teacher_is_larger_and_shares_the_tokenizer(tiny_models):
    student_dir, teacher_dir = tiny_models
    assert (student_dir / "tokenizer.json").read_bytes() == (
        teacher_dir / "tokenizer.json"
    ).read_bytes()
    student_size = (student_dir / "model.safetensors").stat().st_size
    teacher_size = (teacher_dir / "model.safetensors").stat().st_size
    assert teacher_size > 2 * student_size
    assert PRESETS["teacher"].hidden_size > PRESETS["student"].hidden_size
    assert_shared_vocabulary(load_processor(student_dir), load_processor(teacher_dir))


def test_tokenizer_has_single_token_tags_that_survive_decoding(student):
    _, processor = student
    tokenizer = processor.tokenizer
    assert 1000 <= len(tokenizer) <= 2100  # small vocabulary: fast on CPU
    for tag in TAG_TOKENS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, tag
    for token in SPECIAL_TOKENS:
        assert (
            token in tokenizer.all_special_tokens
            or tokenizer.convert_tokens_to_ids(token) is not None
        )
    text = "<think>the MRI shows a lesion</think><answer>B</answer><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (
        tokenizer.decode(ids, skip_special_tokens=True)
        == "<think>the MRI shows a lesion</think><answer>B</answer>"
    )


def test_chat_template_renders_qwen_layout(student):
    _, processor = student
    messages = build_messages(ITEMS[0], "train")
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Question: What imaging"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("which", [0, 1], ids=["student", "teacher"])
def test_loaded_processor_yields_pixel_values_and_forward_with_image_works(tiny_models, which):
    model, processor = load_policy(tiny_models[which])
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    messages = [build_messages(ITEMS[0], "train")]
    inputs = build_prompt_inputs(processor, messages, [_image(0)])
    assert inputs["pixel_values"].ndim == 2 and inputs["pixel_values"].shape[0] > 0
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x64 -> 4x4 patches of 16
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 4  # merged 2x2
    assert inputs["mm_token_type_ids"].sum() == 4
    with torch.no_grad():
        logits = model(**model_inputs(inputs, model)).logits
        other = build_prompt_inputs(processor, messages, [_image(1)])
        other_logits = model(**model_inputs(other, model)).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # The image reaches the language model: another image changes the last position's logits.
    assert (logits[0, -1] - other_logits[0, -1]).abs().max() > 1e-4


def test_fallback_when_autoprocessor_returns_only_the_tokenizer(tiny_models, monkeypatch):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models[0])
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: tokenizer)
    processor = load_processor(tiny_models[0])
    assert processor.image_processor is not None
    check_processor(processor, tiny_models[0])


def test_processor_without_image_processor_fails_loudly(tiny_models, tmp_path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models[0])
    with pytest.raises(ValueError, match="no image processor"):
        check_processor(tokenizer, "some/folder")
    broken = tmp_path / "no_preprocessor"
    shutil.copytree(tiny_models[0], broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "video_preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"no_preprocessor.*preprocessor_config\.json"):
        load_policy(broken)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-tiny"):
        load_policy(tmp_path / "nowhere")


def test_different_tokenizers_are_rejected(tiny_models, tmp_path):
    other = build_tiny(
        tmp_path / "other", "student", corpus_texts=["completely different words only"] * 3
    )
    with pytest.raises(ValueError, match=r"vocabulary|different ids|has id"):
        assert_shared_vocabulary(load_processor(tiny_models[0]), load_processor(other))


def test_device_and_dtype_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


# ------------------------------------------------------------------------------ layout
def test_sequence_batch_layout(student):
    _, processor = student
    messages = [
        build_messages(ITEMS[0], "train"),
        build_messages(ITEMS[1], "train", with_image=False),
    ]
    completions = [[5, 6, 7], [8]]
    batch = build_sequence_batch(
        processor, messages, [_image(0), None], completions, pad_to_multiple_of=16
    )
    total = batch["input_ids"].shape[1]
    width = batch["completion_ids"].shape[1]
    prompt_width = total - width
    assert total % 16 == 0 and width >= 3
    # Completions start at column P, right-padded; prompts are left-padded.
    assert batch["input_ids"][0, prompt_width : prompt_width + 3].tolist() == [5, 6, 7]
    assert batch["input_ids"][1, prompt_width].item() == 8
    assert batch["completion_mask"][0].tolist() == [0] * prompt_width + [1, 1, 1] + [0] * (
        width - 3
    )
    assert batch["completion_mask"][1].tolist() == [0] * prompt_width + [1] + [0] * (width - 1)
    assert batch["attention_mask"][1, 0].item() == 0  # the shorter (no image) prompt is left-padded
    assert batch["attention_mask"][:, prompt_width - 1].tolist() == [1, 1]
    assert batch["mm_token_type_ids"][:, prompt_width:].sum() == 0
    assert batch["image_grid_thw"].shape == (1, 3)  # only row 0 has an image


def test_completion_logprobs_match_an_unpadded_float64_reference(student):
    model, processor = student
    messages = [
        build_messages(ITEMS[0], "train"),
        build_messages(ITEMS[1], "train", with_image=False),
        build_messages(ITEMS[2], "hint_aware", hint="Look at the margins."),
    ]
    images = [_image(0), None, _image(2, (96, 80))]
    completions = [[40, 41, 42, 43], [50, 51], [60, 61, 62]]
    batch = build_sequence_batch(processor, messages, images, completions, pad_to_multiple_of=8)
    with torch.no_grad():
        logprobs, mask = completion_token_logprobs(model, batch)
        logits = completion_logits(model, batch)
    assert logits.shape[:2] == batch["completion_ids"].shape
    assert mask.tolist() == [[1] * len(c) + [0] * (mask.shape[1] - len(c)) for c in completions]
    model64 = model.to(torch.float64)
    try:
        for row, (m, image, ids) in enumerate(zip(messages, images, completions, strict=True)):
            single = build_sequence_batch(processor, [m], [image], [ids])
            if "pixel_values" in single:
                single["pixel_values"] = single["pixel_values"].double()
            with torch.no_grad():
                full = model64(**model_inputs(single, model64)).logits[0].log_softmax(-1)
            start = single["input_ids"].shape[1] - len(ids)
            reference = torch.stack([full[start - 1 + t, token] for t, token in enumerate(ids)])
            assert torch.allclose(logprobs[row, : len(ids)].double(), reference, atol=1e-5)
            assert (logprobs[row, len(ids) :] == 0).all()
    finally:
        model.to(torch.float32)


def test_logprobs_are_differentiable(student):
    model, processor = student
    batch = build_sequence_batch(
        processor, [build_messages(ITEMS[0], "train")], [_image(0)], [[40, 41]]
    )
    logprobs, mask = completion_token_logprobs(model, batch)
    (logprobs * mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_bad_rows_are_rejected_with_the_row_named(student):
    _, processor = student
    messages = [build_messages(ITEMS[0], "train")]
    with pytest.raises(ValueError, match="row 0: its messages have 1 image placeholder"):
        build_prompt_inputs(processor, messages, [None])
    image_pad = vision_token_ids(processor)[0]
    with pytest.raises(ValueError, match="completion row 0 holds token"):
        build_sequence_batch(processor, messages, [_image(0)], [[5, image_pad]])


def test_prompt_of_row_gives_the_tensors_of_one_prompt_per_row(student):
    """Rendering each distinct prompt once and handing it to its rows gives exactly the batch
    that rendering every row's own prompt gives (images, a text-only prompt, any row order)."""
    _, processor = student
    messages = [
        build_messages(ITEMS[0], "train"),
        build_messages(ITEMS[1], "train", with_image=False),
        build_messages(ITEMS[2], "train"),
    ]
    images = [_image(0), None, _image(2, (96, 80))]
    prompt_of_row = [2, 0, 1, 2, 0, 0, 1]
    completions = [[40 + row] * (1 + row % 3) for row in range(len(prompt_of_row))]
    shared = build_sequence_batch(
        processor, messages, images, completions, prompt_of_row=prompt_of_row
    )
    per_row = build_sequence_batch(
        processor,
        [messages[p] for p in prompt_of_row],
        [images[p] for p in prompt_of_row],
        completions,
    )
    assert shared.keys() == per_row.keys()
    for key, value in per_row.items():
        assert torch.equal(shared[key], value), key
    with pytest.raises(ValueError, match="7 prompts but 6 completions"):
        build_sequence_batch(
            processor, messages, images, completions[:6], prompt_of_row=prompt_of_row
        )
