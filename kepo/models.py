"""Load student, teacher and reference models, and build the tensors every forward pass needs.

Loading
-------
`load_policy(path)` loads a LOCAL Hugging Face folder (`local_files_only=True`) with
`AutoModelForImageTextToText`, the code path a real `Qwen3-VL-2B-Instruct` folder takes, and its
processor with `load_processor`. Without torchvision, `AutoProcessor` cannot build
`Qwen3VLProcessor` (its video processor needs torchvision) and, depending on the transformers
version, raises or silently returns the bare tokenizer. `load_processor` then assembles
`ImageOnlyQwen3VLProcessor` (Qwen3VLProcessor without the video processor) from
`AutoImageProcessor` (which picks its PIL backend) and `AutoTokenizer`. `check_processor` proves
that the processor turns an image into `pixel_values`, and fails loudly otherwise.

Tensor layout (shared by generation scoring and the trainer)
-------------------------------------------------------------
`build_sequence_batch` lays a batch of prompt + completion rows out as::

    [pad .. pad | prompt tokens | completion tokens | pad .. pad]
     <-------- P columns -------> <-------- Tc columns -------->

Prompts are LEFT-padded to a common width P, completions RIGHT-padded to a common width Tc, so
every completion starts at column P and `completion_logits` is one slice, no gather. Keys:

- `input_ids`, `attention_mask` (B, P+Tc); `mm_token_type_ids` (B, P+Tc): 1 on image tokens,
  0 elsewhere (zeros over the completion); `pixel_values` (n_patches, C*T*ps*ps) and
  `image_grid_thw` (n_images, 3) for the rows that have an image;
- `completion_ids` (B, Tc): the completion tokens (pad id after each row's end);
- `completion_mask` (B, P+Tc): 1 on completion tokens, 0 on prompt and padding.

Pass the whole dict to `completion_logits` / `completion_token_logprobs`; `model_inputs(batch,
model)` gives just the forward keyword arguments. `completion_logits(model, batch)[b, t]` are the
logits that predict `completion_ids[b, t]` (the usual shift by one), computed with
`logits_to_keep` so the prompt's logits are never materialised.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# Keys of `build_sequence_batch` that are not model forward arguments.
NON_MODEL_KEYS = ("completion_ids", "completion_mask")
VISION_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Tokens whose ids must agree between student and teacher besides the vocabulary as a whole.
CRITICAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<hint>",
    "</hint>",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ devices
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' = the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but no CUDA GPU is visible; use 'cpu' or 'auto'"
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------ processor
def _image_only_processor_class():
    """Qwen3VLProcessor without a video processor (built lazily: transformers import cost)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL processor for images only; needs no torchvision."""

        # Older transformers read the sub-processors from these; newer ones from __init__.
        attributes = ["image_processor", "tokenizer"]  # noqa: RUF012
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    return ImageOnlyQwen3VLProcessor


def _model_type(path: Path) -> str | None:
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("model_type")


def load_processor(path: str | Path) -> Any:
    """The processor of a local model folder, with or without torchvision (see module docstring)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    path = Path(path)
    _require_folder(path)
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, ValueError, OSError, TypeError) as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        log.info(
            "AutoProcessor could not load %s (%s); assembling an image-only processor",
            path,
            reason.strip(),
        )
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        return processor

    if _model_type(path) not in ("qwen3_vl", None):
        raise ValueError(
            f"{path}: AutoProcessor gave no image processor and the image-only fallback supports "
            f"Qwen3-VL folders only (model_type {_model_type(path)!r}); install torchvision"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: no image processor could be loaded ({err}). Fix: the folder needs the "
            "base model's preprocessor_config.json (copy it from the original checkpoint)"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    chat_template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if chat_template is None:
        chat_template = _read_chat_template(path)
    return _image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def _read_chat_template(path: Path) -> str | None:
    import json

    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def _require_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {path} does not exist; models load from local folders only "
            "(build a tiny one with `kepo models build-tiny`, or download the checkpoint first)"
        )


def check_processor(processor: Any, where: str | Path = "the model folder") -> None:
    """Raise unless `processor` turns a chat with one image into pixel_values + image tokens."""
    fix = (
        f"Fix: {where} needs preprocessor_config.json and the tokenizer files of the base model; "
        "without torchvision, load it with kepo.models.load_processor (not AutoProcessor)"
    )
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"the processor loaded from {where} is a {type(processor).__name__} with no image "
            f"processor, so images would be silently dropped. {fix}"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    image = Image.new("RGB", (64, 64), (128, 64, 32))
    try:
        inputs = build_prompt_inputs(processor, [messages], [image])
    except Exception as err:
        raise ValueError(
            f"the processor loaded from {where} failed on an image: {err}. {fix}"
        ) from err
    if "pixel_values" not in inputs or "image_grid_thw" not in inputs:
        raise ValueError(
            f"the processor loaded from {where} returned {sorted(inputs.keys())} for an image: "
            f"no pixel_values. {fix}"
        )
    image_id = _token_id(processor, "<|image_pad|>")
    n_tokens = int((inputs["input_ids"] == image_id).sum())
    merge = getattr(processor.image_processor, "merge_size", 2)
    expected = int(inputs["image_grid_thw"].prod(-1).sum()) // (merge * merge)
    if n_tokens != expected or n_tokens == 0:
        raise ValueError(
            f"the processor loaded from {where} wrote {n_tokens} image tokens for an image of "
            f"{expected} merged patches; the chat template or tokenizer does not match. {fix}"
        )


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _token_id(processor: Any, token: str) -> int | None:
    tokenizer = _tokenizer(processor)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the vision control tokens a policy must never generate."""
    ids = {_token_id(processor, token) for token in VISION_TOKENS}
    return sorted(i for i in ids if i is not None)


def stop_token_ids(processor: Any, model: Any = None) -> list[int]:
    """Ids that end a completion: <|im_end|>, <|endoftext|>, the tokenizer's and model's eos."""
    ids = {_token_id(processor, token) for token in STOP_TOKENS}
    ids.add(_tokenizer(processor).eos_token_id)
    if model is not None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def pad_token_id(processor: Any) -> int:
    tokenizer = _tokenizer(processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(
            "the tokenizer has neither a pad nor an eos token; set pad_token in tokenizer_config.json"
        )
    return int(pad)


def assert_shared_vocabulary(
    student_processor: Any,
    teacher_processor: Any,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> None:
    """Raise unless student and teacher tokenize identically (same size, same token -> id map).

    Distillation compares the two distributions token id by token id, so any difference in the
    vocabulary silently compares unrelated tokens.
    """
    student_vocab = _tokenizer(student_processor).get_vocab()
    teacher_vocab = _tokenizer(teacher_processor).get_vocab()
    fix = "use a teacher from the same model family with the same tokenizer files"
    if len(student_vocab) != len(teacher_vocab):
        raise ValueError(
            f"{student_name} has {len(student_vocab)} tokens and {teacher_name} "
            f"{len(teacher_vocab)}: they do not share a vocabulary; {fix}"
        )
    for token in CRITICAL_TOKENS:
        if student_vocab.get(token) != teacher_vocab.get(token):
            raise ValueError(
                f"token {token!r} has id {student_vocab.get(token)} in {student_name} and "
                f"{teacher_vocab.get(token)} in {teacher_name}; {fix}"
            )
    if student_vocab != teacher_vocab:
        differing = sorted(t for t in student_vocab if teacher_vocab.get(t) != student_vocab[t])[:5]
        raise ValueError(
            f"{student_name} and {teacher_name} map tokens to different ids (e.g. {differing}); {fix}"
        )


# ------------------------------------------------------------------------------ models
DeviceMap = str | Mapping[str, int | str]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def normalize_max_memory(max_memory: Mapping[Any, str | int] | None) -> dict[Any, str | int] | None:
    """accelerate's max_memory: GPU keys as ints (0, '0' or 'cuda:0' -> 0), 'cpu' / 'disk' as is."""
    if max_memory is None:
        return None
    normalized: dict[Any, str | int] = {}
    for key, value in max_memory.items():
        name = str(key).removeprefix("cuda:")
        if name.isdigit():
            normalized[int(name)] = value
        elif name in ("cpu", "disk"):
            normalized[name] = value
        else:
            raise ValueError(
                f"max_memory key {key!r} is not a device; use GPU indices (0, 1, ...), 'cpu' or 'disk'"
            )
    return normalized


def teacher_placement(models: Any) -> dict[str, Any]:
    """`load_model` keyword arguments that place the teacher as `models.teacher_device_map` /
    `models.teacher_max_memory` say (empty when the teacher is loaded whole on one device)."""
    device_map = getattr(models, "teacher_device_map", None)
    if device_map is None:
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(
            f"models.teacher_device_map {device_map!r} is not a strategy; use one of "
            f"{', '.join(DEVICE_MAP_STRATEGIES)} or a {{module: device}} map"
        )
    placement = {
        "device_map": device_map,
        "max_memory": normalize_max_memory(getattr(models, "teacher_max_memory", None)),
    }
    if getattr(models, "teacher_offload_folder", None) is not None:
        placement["offload_folder"] = models.teacher_offload_folder
    return placement


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[Any, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> torch.nn.Module:
    """The model of a local folder via AutoModelForImageTextToText, in eval mode.

    Without `device_map` the whole model goes to `device`. With it, accelerate places the
    modules (a strategy such as 'auto', or an explicit {module: device} map, capped per device
    by `max_memory`; modules mapped to 'disk' are offloaded to `offload_folder`), `device` is
    ignored and inputs move between devices through accelerate's hooks.
    """
    from transformers import AutoModelForImageTextToText

    if max_memory is not None and device_map is None:
        raise ValueError("max_memory needs a device_map (e.g. 'auto') to take effect")
    path = Path(path)
    _require_folder(path)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is None:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model.to(resolve_device(device)).eval()
    kwargs["device_map"] = dict(device_map) if isinstance(device_map, Mapping) else device_map
    if max_memory is not None:
        kwargs["max_memory"] = normalize_max_memory(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except ValueError as err:
        first_line = str(err).splitlines()[0][:300]
        raise ValueError(
            f"{path}: device_map {device_map!r} could not place the model ({first_line}). Fix: "
            "map every top-level module (e.g. model.visual, model.language_model.layers.N, "
            "lm_head), or use device_map: auto"
        ) from err
    log.info("%s placed by device_map: %s", path, placement_summary(model))
    return model.eval()


def placement_summary(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per device of a (possibly dispatched) model, e.g. {'cuda:0': n, 'cuda:1': m}."""
    device_map = getattr(model, "hf_device_map", None)
    counts: dict[str, int] = {}
    if device_map:
        modules = dict(model.named_modules())
        seen: set[int] = set()  # tied weights (lm_head = embed_tokens) count once
        for name, device in device_map.items():
            module = modules.get(name, model) if name else model
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            key = f"cuda:{device}" if isinstance(device, int) else str(device)
            counts[key] = counts.get(key, 0) + sum(p.numel() for p in params)
        return counts
    for p in model.parameters():
        counts[str(p.device)] = counts.get(str(p.device), 0) + p.numel()
    return counts


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward pass's inputs go: the input embeddings' device (the first device of a
    model split by device_map), else the first parameter's."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
        if device.type != "meta":
            return device
    # Offloaded weights sit on 'meta'; accelerate then runs them on the first GPU of the map.
    gpus = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if isinstance(d, int)]
    if gpus:
        return torch.device("cuda", min(gpus))
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


# Files of a model folder that `save_pretrained` writes itself, or that are not the processor.
_NOT_PROCESSOR_FILES = ("config.json", "generation_config.json", "optimizer.pt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def save_model(
    model: Any,
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as a complete Hugging Face folder `out_dir`, visible only when complete.

    The weights via `save_pretrained` (cast to `dtype` when given, the model itself untouched;
    config.json then names that dtype; `state_dict` instead of the model's own, e.g. the full
    weights gathered from a sharded model, `kepo.sharded.full_model_state`), the processor/tokenizer files of `source_dir` copied
    verbatim, and `extra` ({file name: object}) with torch.save; all into a temporary sibling
    folder (named after this process, so two writers never share it) renamed to `out_dir` at
    the end. An existing `out_dir` is replaced.
    """
    import os
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        target = resolve_dtype(dtype) if dtype is not None else None
        if target is None or all(p.dtype == target for p in model.parameters()):
            given = {} if state_dict is None else {"state_dict": dict(state_dict)}
            model.save_pretrained(tmp, safe_serialization=True, **given)
        else:
            model.save_pretrained(
                tmp,
                safe_serialization=True,
                state_dict=cast_state_dict(model, target, state_dict=state_dict),
            )
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            config["dtype"] = str(target).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for src in sorted(Path(source_dir).iterdir()):
            name = src.name
            if (
                src.is_file()
                and name not in _NOT_PROCESSOR_FILES
                and not name.endswith(_WEIGHT_SUFFIXES)
                and not (tmp / name).exists()
            ):
                shutil.copyfile(src, tmp / name)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cast_state_dict(
    model: torch.nn.Module,
    dtype: torch.dtype,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The model's state dict (or `state_dict`, the model's full weights gathered elsewhere)
    with floating tensors cast to `dtype` on the CPU; tensors that share storage (tied
    embeddings) stay shared, and modules the model keeps in float32 (`_keep_in_fp32_modules`)
    stay float32."""
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    source = model.state_dict() if state_dict is None else state_dict
    for name, tensor in source.items():
        if not tensor.is_floating_point() or any(m in name.split(".") for m in keep_fp32):
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.detach().to(device="cpu", dtype=dtype)
        out[name] = cast[key]
    return out


def load_policy(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[Any, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of a local folder; the processor is checked to produce pixel values.
    `device_map` / `max_memory` / `offload_folder` as in `load_model`."""
    processor = load_processor(path)
    check_processor(processor, path)
    model = load_model(
        path,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )
    return model, processor


# ------------------------------------------------------------------------------ tensors
def _count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(
                1 for part in content if isinstance(part, Mapping) and part.get("type") == "image"
            )
    return count


def _as_rgb(image: Any, row: int) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"row {row}: image must be a PIL image or a numpy array, got {type(image).__name__}"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def render_prompts(
    processor: Any, messages_list: Sequence[Sequence[Mapping[str, Any]]]
) -> list[str]:
    """The chat-template text of each prompt, ending with the assistant generation prompt."""
    return [
        processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        for messages in messages_list
    ]


def mm_token_type_ids_for(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """1 on image tokens, 2 on video tokens, 0 elsewhere (for versions whose processor omits it)."""
    types = torch.zeros_like(input_ids)
    image_id = _token_id(processor, "<|image_pad|>")
    video_id = _token_id(processor, "<|video_pad|>")
    if image_id is not None:
        types[input_ids == image_id] = 1
    if video_id is not None:
        types[input_ids == video_id] = 2
    return types


def build_prompt_inputs(
    processor: Any,
    messages_list: Sequence[Sequence[Mapping[str, Any]]],
    images: Sequence[Any],
    *,
    padding_side: str = "left",
) -> Any:
    """Processor inputs (a BatchFeature of tensors) for a batch of chat prompts.

    images[i] is row i's image (PIL or numpy) or None; a row with an image must have exactly one
    {"type": "image"} part in its messages and a row without one none. Returns input_ids,
    attention_mask, mm_token_type_ids (B, P) and, when any row has an image, pixel_values and
    image_grid_thw (the images of the rows in row order).
    """
    if len(messages_list) != len(images):
        raise ValueError(
            f"{len(messages_list)} prompts but {len(images)} images; pass one image (or None) per prompt"
        )
    if not messages_list:
        raise ValueError("build_prompt_inputs needs at least one prompt")
    row_images = []
    for row, (messages, image) in enumerate(zip(messages_list, images, strict=True)):
        n_parts = _count_images(messages)
        if n_parts != (0 if image is None else 1):
            raise ValueError(
                f"row {row}: its messages have {n_parts} image placeholder(s) but "
                f"{'no image' if image is None else 'one image'} was given; build the messages with "
                "with_image=True exactly when the row has an image"
            )
        if image is not None:
            row_images.append(_as_rgb(image, row))
    texts = render_prompts(processor, messages_list)
    tokenizer = _tokenizer(processor)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side  # a call argument is not accepted by every version
    try:
        inputs = processor(text=texts, images=row_images or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous_side
    if "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = mm_token_type_ids_for(processor, inputs["input_ids"])
    inputs.pop("token_type_ids", None)
    return inputs


def build_sequence_batch(
    processor: Any,
    messages_list: Sequence[Sequence[Mapping[str, Any]]],
    images: Sequence[Any],
    completion_ids_list: Sequence[Sequence[int]],
    *,
    pad_to_multiple_of: int | None = None,
    prompt_of_row: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Prompt + completion rows in the layout of the module docstring (CPU tensors).

    Tc is the longest completion, raised so that P + Tc is a multiple of `pad_to_multiple_of`
    when given. Completions must not contain vision placeholder tokens (they would be read as
    image slots by the forward pass).

    `prompt_of_row`: when given, `messages_list` / `images` are the DISTINCT prompts and row b
    (completion b) takes prompt `prompt_of_row[b]`; each prompt is then rendered, tokenised and
    its image processed once, and the rows get the same tensors as passing every row's own
    prompt would give (the G rows of a prompt share one).
    """
    n_rows = len(messages_list) if prompt_of_row is None else len(prompt_of_row)
    if len(completion_ids_list) != n_rows:
        raise ValueError(f"{n_rows} prompts but {len(completion_ids_list)} completions")
    prompt = build_prompt_inputs(processor, messages_list, images, padding_side="left")
    if prompt_of_row is not None:
        prompt = _prompt_rows(prompt, [image is not None for image in images], prompt_of_row)
    pad_id = pad_token_id(processor)
    forbidden = set(vision_token_ids(processor))
    vocab_limit = len(_tokenizer(processor))
    for row, ids in enumerate(completion_ids_list):
        for t, token in enumerate(ids):
            if token in forbidden or not 0 <= token < vocab_limit:
                raise ValueError(
                    f"completion row {row} holds token {token} at position {t}: a vision control "
                    f"token or an id outside the vocabulary (size {vocab_limit}); generation must "
                    "suppress vision tokens"
                )
    batch_size, prompt_width = prompt["input_ids"].shape
    width = max((len(ids) for ids in completion_ids_list), default=0)
    if pad_to_multiple_of:
        total = prompt_width + width
        width += (-total) % pad_to_multiple_of
    completion_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # (B, Tc)
    completion_attention = torch.zeros((batch_size, width), dtype=torch.long)  # (B, Tc)
    for row, ids in enumerate(completion_ids_list):
        if ids:
            completion_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            completion_attention[row, : len(ids)] = 1
    prompt_zeros = torch.zeros((batch_size, prompt_width), dtype=torch.long)
    batch = {
        "input_ids": torch.cat([prompt["input_ids"], completion_ids], dim=1),  # (B, P+Tc)
        "attention_mask": torch.cat([prompt["attention_mask"], completion_attention], dim=1),
        "mm_token_type_ids": torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
        ),
        "completion_ids": completion_ids,
        "completion_mask": torch.cat([prompt_zeros, completion_attention], dim=1),  # (B, P+Tc)
    }
    for key in ("pixel_values", "image_grid_thw"):
        if key in prompt:
            batch[key] = prompt[key]
    return batch


def _prompt_rows(prompt: Any, has_image: Sequence[bool], prompt_of_row: Sequence[int]) -> dict:
    """Inputs of distinct prompts (`has_image[p]`: prompt p has an image) handed to rows."""
    rows = torch.as_tensor(list(prompt_of_row), dtype=torch.long)
    out = {k: v[rows] for k, v in prompt.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in prompt:
        image_of_prompt = np.cumsum(has_image) - 1  # prompt -> its image among the processed
        images = [int(image_of_prompt[p]) for p in prompt_of_row if has_image[p]]
        patches = image_patch_slices(prompt["image_grid_thw"])
        out["image_grid_thw"] = prompt["image_grid_thw"][images]
        out["pixel_values"] = torch.cat([prompt["pixel_values"][patches[i]] for i in images])
    return out


def _forward_parameters(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_argument(model: Any) -> str | None:
    """The name under which `model.forward` takes a key/value cache: `cache` (transformers
    5.2x), `past_key_values` (5.19 and older), or None when it takes neither. A cache passed
    under the other name would land in `**kwargs` and be ignored."""
    parameters = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def model_inputs(batch: Mapping[str, torch.Tensor], model: Any = None) -> dict[str, torch.Tensor]:
    """The forward keyword arguments of a batch (drops completion bookkeeping; drops
    mm_token_type_ids for transformers versions whose model does not take it)."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    if model is not None and "mm_token_type_ids" in inputs:
        parameters = _forward_parameters(model)
        if "mm_token_type_ids" not in parameters and "kwargs" not in parameters:
            inputs.pop("mm_token_type_ids")
    return inputs


def batch_to(
    batch: Mapping[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Move a batch to a device; pixel_values also to the model dtype when given."""
    moved = {}
    for key, value in batch.items():
        if key == "pixel_values" and dtype is not None:
            moved[key] = value.to(device=device, dtype=dtype)
        else:
            moved[key] = value.to(device)
    return moved


def completion_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, Tc, V) with [b, t] predicting completion_ids[b, t]; differentiable.

    Only the last Tc + 1 positions' logits are computed (`logits_to_keep`): position P - 1
    predicts the first completion token, position P + Tc - 2 the last.
    """
    width = batch["completion_ids"].shape[1]
    inputs = model_inputs(batch, model)
    outputs = model(**inputs, use_cache=False, logits_to_keep=width + 1)
    return outputs.logits[:, :-1, :]  # (B, Tc, V)


def gather_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., token] in float32, one row at a time to bound memory: (B, T)."""
    rows = []
    for row_logits, row_ids in zip(logits, token_ids, strict=True):
        logprobs = torch.log_softmax(row_logits.float(), dim=-1)  # (T, V)
        rows.append(logprobs.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
    if not rows:
        return logits.new_zeros(token_ids.shape, dtype=torch.float32)
    return torch.stack(rows)


def completion_mask_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (B, Tc) mask of real completion tokens (the completion columns of completion_mask)."""
    width = batch["completion_ids"].shape[1]
    total = batch["completion_mask"].shape[1]
    return batch["completion_mask"][:, total - width :]


def completion_token_logprobs(
    model: Any, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, Tc) float32 of completion_ids under the model, and their mask
    (B, Tc); padded positions are 0. Differentiable (no torch.no_grad inside)."""
    logits = completion_logits(model, batch)
    mask = completion_mask_of(batch)
    logprobs = gather_token_logprobs(logits, batch["completion_ids"])
    return logprobs * mask, mask


# ------------------------------------------------------------------------------ shared images
def _image_encoder(model: Any) -> Any | None:
    """The model's `get_image_features` (through any DDP wrapper), or None when it has none or
    its forward takes no precomputed features (`mm_encoder_outputs`)."""
    inner = model.module if hasattr(model, "module") else model
    if "mm_encoder_outputs" not in _forward_parameters(inner):
        return None
    return getattr(getattr(inner, "model", None), "get_image_features", None)


def image_features_for_rows(
    model: Any,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    image_of_row: Sequence[int],
) -> Any | None:
    """Encode each image of `pixel_values` / `image_grid_thw` (n_images, 3) ONCE and hand row b
    the features of image `image_of_row[b]` (rows with no image left out of the list).

    Returns the vision tower's output object with its per-image tuples (`pooler_output`, and
    `deepstack_features` per layer) re-indexed from images to rows, for the forward's
    `mm_encoder_outputs={"image": ...}` argument; rows that share an image share one tensor,
    so under autograd the gradient of that encoding sums over the rows, as the gradients of
    per-row encodings would. None when the model takes no precomputed features.
    """
    encode = _image_encoder(model)
    if encode is None:
        return None
    features = encode(pixel_values, image_grid_thw, return_dict=True)
    features.pooler_output = tuple(features.pooler_output[i] for i in image_of_row)
    features.deepstack_features = [
        tuple(layer[i] for i in image_of_row) for layer in features.deepstack_features
    ]
    return features


def image_patch_slices(image_grid_thw: torch.Tensor) -> list[slice]:
    """The rows of `pixel_values` that belong to each image (n_images slices, in order)."""
    slices, start = [], 0
    for n in image_grid_thw.prod(-1).tolist():  # pixel rows per image
        slices.append(slice(start, start + n))
        start += n
    return slices


def vision_once_per_image(
    model: Any, batch: dict[str, Any], image_keys: Sequence[str]
) -> dict[str, Any]:
    """Run the vision tower once per distinct image of a batch, not once per row.

    The G rows of a prompt carry the same image: its patches are encoded once and the features
    (and the deepstack features) are handed to every row through the model's
    `mm_encoder_outputs` argument (`image_features_for_rows`). `image_keys[b]` names row b's
    image (its prompt id). The batch comes back unchanged when no image repeats, when some row
    has no image, when the model takes no precomputed features, or when it is sharded (FSDP:
    its vision tower holds shards outside the model's forward).
    """
    from kepo.sharded import is_fsdp_module

    grid = batch.get("image_grid_thw")
    if (
        is_fsdp_module(model)
        or grid is None
        or "pixel_values" not in batch
        or _image_encoder(model) is None
        or grid.shape[0] != len(image_keys)
        or len(set(image_keys)) == len(image_keys)
    ):
        return batch
    first_row: dict[str, int] = {}
    source = [first_row.setdefault(key, row) for row, key in enumerate(image_keys)]  # row -> row
    distinct = sorted(first_row.values())
    patches = image_patch_slices(grid)
    pixels = torch.cat([batch["pixel_values"][patches[r]] for r in distinct])
    slot = {row: i for i, row in enumerate(distinct)}
    features = image_features_for_rows(model, pixels, grid[distinct], [slot[r] for r in source])
    out = {k: v for k, v in batch.items() if k != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": features}
    return out
