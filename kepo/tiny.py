"""Tiny Qwen3-VL models for tests and CPU demos, built offline and saved in Hugging Face format.

`build_tiny(out, preset="student")` writes a folder with the same files a real
`Qwen3-VL-2B-Instruct` checkpoint has, so it loads through `kepo.models.load_policy` exactly as
the real one does:

- `config.json` + `model.safetensors`: a `Qwen3VLForConditionalGeneration` built from a
  `Qwen3VLConfig` with random weights drawn from `torch.manual_seed(seed)`;
- `generation_config.json`: the stop ids (`<|im_end|>`, `<|endoftext|>`) and the sampling
  defaults the real instruct model ships (do_sample, temperature 0.7, top-p 0.8, top-k 20), so
  the backends are tested against a folder whose defaults they must override;
- `tokenizer.json` / `tokenizer_config.json` / `chat_template.jinja`: a byte-level BPE trained
  locally with `tokenizers` on the prompt templates (`kepo.prompts.vocabulary_corpus`) plus
  dataset text (questions, options, rationales, hints from curated Parquet files) or, without
  Parquet files, a built-in medical word list. `<think>`, `</think>`, `<answer>`, `</answer>`,
  `<hint>`, `</hint>` are added as single NON-special tokens (decoding with
  `skip_special_tokens=True` keeps them); the Qwen control tokens (`<|im_start|>`,
  `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`,
  `<|endoftext|>`) are special tokens. The chat template renders Qwen's layout:
  `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\\n<|im_start|>assistant\\n`;
- `preprocessor_config.json` / `video_preprocessor_config.json`: the real folder's processor
  classes (`Qwen3VLProcessor`, `Qwen2VLImageProcessorFast`) with patch 16, merge 2 and small
  pixel limits (64x64 to 128x128 pixels of area), so a 64x64 image gives 4 image tokens and a
  96x96 one 9.

The student preset (text hidden 128, 2 layers) and the teacher preset (hidden 256, 4 layers)
share one tokenizer: `build_tiny_pair` trains it once and the teacher folder gets a byte copy.
The tokenizer depends only on the corpus, so two separate `build_tiny` calls on the same corpus
also produce identical tokenizer files. Everything is deterministic for a (seed, corpus).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kepo.prompts import vocabulary_corpus

log = logging.getLogger(__name__)

# Tags the rewards parse; single tokens, NOT special (skip_special_tokens keeps them).
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>")
# Qwen control tokens the processor and chat template need.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template: one turn per message, the image placeholder where the content
# part says so, and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Used when no curated Parquet file is given: words a medical VQA item is likely to contain.
MEDICAL_WORDS = """
image imaging scan shows shown showing visible seen finding findings normal abnormal lesion
lesions mass nodule tumor tumour cyst fracture edema oedema hemorrhage haemorrhage infarct
inflammation infection effusion calcification atrophy enlargement stenosis occlusion aneurysm
malignant benign metastasis carcinoma adenoma glioma meningioma lymphoma melanoma nevus
keratosis dermatofibroma retinopathy glaucoma cataract macular degeneration drusen edema
choroidal neovascularization retina retinal optic disc fundus cornea lens vessel vessels
brain skull head neck spine spinal cord vertebra vertebral chest lung lungs pulmonary heart
cardiac aorta liver hepatic kidney renal spleen pancreas gallbladder bladder stomach bowel
colon intestine abdomen abdominal pelvis pelvic uterus ovary prostate breast thyroid bone
bones joint knee hip shoulder hand foot ankle wrist elbow muscle tissue soft skin cell cells
nucleus nuclei cytoplasm membrane blood red white platelet stained staining histology
pathology microscopy microscope slide specimen biopsy magnification
MRI CT X-Ray ultrasound dermoscopy fundus photography OCT optical coherence tomography
magnetic resonance computed radiograph radiography sonography echo contrast enhanced
weighted T1 T2 FLAIR DWI axial sagittal coronal view plane slice section left right upper
lower anterior posterior medial lateral superior inferior proximal distal bilateral
unilateral central peripheral diffuse focal small large round oval irregular smooth bright
dark hyperintense hypointense hyperechoic hypoechoic hyperdense hypodense opacity
consolidation pneumonia pneumothorax cardiomegaly atelectasis nodules infiltrate
tuberculosis covid emphysema fibrosis grade stage mild moderate severe proliferative
diabetic disease diagnosis anatomy identification modality recognition biological
attributes lesion grading question answer option options correct choice which what where
how many most likely type organ structure region area located location this the a an of in
on at with without and or is are was be by from to for as most least present absent patient
""".split()  # noqa: SIM905 - a word list reads better as text


@dataclass(frozen=True)
class TinyPreset:
    """Shape of one tiny model (text decoder + vision tower)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vision_depth: int
    vision_hidden_size: int
    vision_heads: int
    vision_intermediate_size: int


PRESETS: dict[str, TinyPreset] = {
    "student": TinyPreset(128, 2, 4, 2, 32, 256, 2, 64, 4, 128),
    "teacher": TinyPreset(256, 4, 4, 2, 64, 512, 2, 64, 4, 128),
}

# Image processor: patch 16, merge 2 (as Qwen3-VL), area between 64x64 and 128x128 pixels.
PATCH_SIZE = 16
MERGE_SIZE = 2
MIN_PIXELS = 64 * 64
MAX_PIXELS = 128 * 128
DEFAULT_BPE_VOCAB = 1024


# ------------------------------------------------------------------------------ tokenizer
def corpus_from_parquet(paths: Sequence[str | Path]) -> list[str]:
    """Question, option, gold, rationale and hint texts of curated Parquet files."""
    import pyarrow.parquet as pq

    wanted = ("question", "options", "gold_text", "rationale", "reference_hint")
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus file {path} does not exist; pass curated Parquet files "
                "(e.g. data/curated/train.parquet) or omit --corpus to use the built-in word list"
            )
        table = pq.read_table(path)
        columns = [name for name in wanted if name in table.column_names]
        if not columns:
            raise ValueError(
                f"{path} has none of the columns {wanted}; it is not a curated questions file"
            )
        for name in columns:
            for value in table.column(name).to_pylist():
                if value is None:
                    continue
                if isinstance(value, list):
                    texts.extend(v for v in value if isinstance(v, str))
                else:
                    texts.append(str(value))
    return texts


def default_corpus() -> list[str]:
    """The built-in medical word list as sentences of ten words."""
    return [" ".join(MEDICAL_WORDS[i : i + 10]) for i in range(0, len(MEDICAL_WORDS), 10)]


def train_tokenizer(corpus_texts: Iterable[str], *, vocab_size: int = DEFAULT_BPE_VOCAB):
    """Train the byte-level BPE tokenizer and wrap it for transformers (not yet saved).

    The prompt templates are repeated so their words become whole tokens even next to a large
    dataset corpus. Returns a `PreTrainedTokenizerFast` with eos `<|im_end|>`, pad
    `<|endoftext|>` and the Qwen chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat_words = ["user\n", "assistant\n", "system\n"]
    texts = [*vocabulary_corpus(), *chat_words] * 8 + [t for t in corpus_texts if t]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# ------------------------------------------------------------------------------ model
def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen3-VL's 24:20:20 ratio."""
    half = head_dim // 2
    hw = half * 20 // 64
    return [half - 2 * hw, hw, hw]


def tiny_config(preset: TinyPreset, tokenizer):
    """A `Qwen3VLConfig` for a preset whose special ids come from `tokenizer`."""
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": preset.hidden_size,
            "intermediate_size": preset.intermediate_size,
            "num_hidden_layers": preset.num_layers,
            "num_attention_heads": preset.num_heads,
            "num_key_value_heads": preset.num_kv_heads,
            "head_dim": preset.head_dim,
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": _mrope_section(preset.head_dim),
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": preset.vision_depth,
            "hidden_size": preset.vision_hidden_size,
            "intermediate_size": preset.vision_intermediate_size,
            "num_heads": preset.vision_heads,
            "out_hidden_size": preset.hidden_size,  # must equal the text hidden size
            "num_position_embeddings": 256,  # a perfect square (16 x 16 patch grid)
            "deepstack_visual_indexes": [preset.vision_depth - 1],  # < vision depth
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _processor_files(out: Path) -> None:
    """Write the processor configs with the keys a real Qwen3-VL folder has."""
    common = {
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2,
        "merge_size": MERGE_SIZE,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {
        **common,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }
    video = {
        **common,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS * 4},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2, sort_keys=True))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # transformers versions differ on where the template goes; always ship the .jinja file.
    chat_template_file = out / "chat_template.jinja"
    if not chat_template_file.exists():
        chat_template_file.write_text(CHAT_TEMPLATE)


def _load_saved_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def build_tiny(
    out: str | Path,
    preset: str = "student",
    *,
    seed: int = 0,
    corpus_texts: Sequence[str] | None = None,
    tokenizer_from: str | Path | None = None,
    vocab_size: int = DEFAULT_BPE_VOCAB,
) -> Path:
    """Build one tiny model folder; returns its path.

    corpus_texts: extra tokenizer text (None = the built-in medical word list).
    tokenizer_from: copy the tokenizer files of this folder instead of training one (how the
    teacher gets the student's vocabulary).
    """
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        missing = [name for name in TOKENIZER_FILES[:2] if not (source / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source} lacks {missing}; point tokenizer_from at a folder built by build_tiny"
            )
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and source.resolve() != out.resolve():
                shutil.copyfile(source / name, out / name)
    else:
        texts = default_corpus() if corpus_texts is None else list(corpus_texts)
        _save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), out)
    tokenizer = _load_saved_tokenizer(out)

    config = tiny_config(PRESETS[preset], tokenizer)
    # Seeded, CPU, fp32 initialisation: the same seed gives the same weights on every machine.
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    stop_ids = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    # The real instruct model's defaults (sampling on): backends must override them explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=stop_ids[1],
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[1],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.0,
    )
    model.save_pretrained(out)
    _processor_files(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny %s (%d parameters, vocab %d) in %s", preset, n_params, len(tokenizer), out)
    return out


def build_tiny_pair(
    out_dir: str | Path, seed: int = 0, corpus_texts: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Build `out_dir/student` and `out_dir/teacher` sharing one tokenizer; returns both paths.

    The teacher's weights are seeded with `seed + 1` so the two models differ beyond shape.
    """
    out_dir = Path(out_dir)
    student = build_tiny(out_dir / "student", "student", seed=seed, corpus_texts=corpus_texts)
    teacher = build_tiny(out_dir / "teacher", "teacher", seed=seed + 1, tokenizer_from=student)
    return student, teacher
