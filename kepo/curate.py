"""Curation: an OmniMedVQA-layout folder -> validated train / test / rejects Parquet + manifest.

Input layout (the OmniMedVQA open-access release, and MiniMedVQA built by `kepo.bundled`):

    ROOT/QA_information/Open-access/<Dataset>.json    each a JSON list of records
    ROOT/<image_path>                                images; `image_path` is relative to ROOT

Every record is checked in the order of `REJECT_REASONS`; the first failing check sends it to
`rejects.parquet` with that reason code and the offending value, so each record read is either
accepted or rejected exactly once (read = accepted + rejected). The checks normalise the
release's quirks: the modality key may be `modality_type` or `modality`, its verbatim strings
(`MR (Mag-netic Resonance Imaging)`, `OCT (Optical Coherence Tomography`, ...) map to the paper's
eight names, options are `option_A`.. collected in order up to the first missing one (2 to 6),
and `gt_answer` is option *text*, matched case-insensitively with a trailing "." stripped. Of
several records carrying one `question_id`, the first (in file-name, then list order) that passes
the field checks owns the id; the later ones are rejected as `duplicate_question_id`, even when
the owner's image then turns out missing or corrupt.

The protocol (all seeds and sizes in `CurationConfig`, all recorded in `manifest.json`):

1. Split by image. Each accepted image (sha256 of its bytes) has a home modality: that of its
   first accepted record. For the modality at position i of `MODALITIES`, its images sorted by
   sha256 are permuted with `numpy.random.default_rng([split_seed, i]).permutation`; the first
   `floor(train_fraction * n + 0.5)` go to the train part, the rest to the test part. Every
   question follows its image, so no image (and no question) is on both sides, even when one
   image is shared by several questions, paths or datasets: duplicates are *moved* with their
   image, never rejected.
2. Samples. Train: the train-part questions of `train_modality`, sorted by question_id, and
   `default_rng([sample_seed, 0]).choice(n, train_size, replace=False)`. Test: for modality i,
   its test-part questions sorted by question_id and `default_rng([sample_seed, 1, i])`, drawing
   `test_per_modality`. A pool no larger than the request is taken whole and the shortfall is
   recorded in the manifest. Output rows are ordered by (modality position, question_id).

Outputs in DIR: train.parquet, test.parquet (schema `questions`), pool.parquet (the whole
train part of every modality, for warm-up or SFT; never shares an image with test),
rejects.parquet (schema `rejects`), manifest.json (source file sha256s, settings, seeds, counts, real-image counts per
modality, output sha256s, kepo version, dataset root). The manifest is written last, so a folder
with a manifest is complete. `kepo.dataset.QuestionSet` reads a curated folder back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import kepo.progress
from kepo.bundled import BUNDLED_FORMAT_VERSION, build_bundled
from kepo.config import CurationConfig
from kepo.omnimedvqa import OMNIMEDVQA_MODALITY_STRINGS, QA_SUBDIR
from schemas.core import Table
from schemas.tables import LETTERS, MODALITIES, QUESTION_TYPES, QUESTIONS, REJECTS

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
UNKNOWN_MODALITY = "(unknown)"

# Bundled (MiniMedVQA) defaults for `kepo curate bundled`; the CurationConfig defaults are the paper's.
BUNDLED_OUT_DIR = Path("data/minimedvqa")
BUNDLED_TRAIN_SIZE = 300
BUNDLED_TEST_PER_MODALITY = 60

# Reason codes, in the order the checks run (the first failing check names the reason).
REJECT_REASONS: dict[str, str] = {
    "not_a_record": "The list entry is not a JSON object.",
    "missing_field": "A required field (question_id, question, gt_answer, image_path, "
    "question_type, modality_type/modality) is absent, null or empty.",
    "unknown_modality": "The modality string maps to none of the eight modalities.",
    "unknown_question_type": "The question type is none of the five OmniMedVQA types.",
    "too_few_options": "Fewer than two options (option_A, option_B, ... up to the first missing).",
    "gt_not_in_options": "gt_answer matches no option text (case-insensitive, trailing '.' ignored).",
    "gt_matches_several_options": "gt_answer matches more than one option text.",
    "bad_field_value": "An extra field has a value outside its domain (e.g. image_source).",
    "duplicate_question_id": "An earlier record with valid fields already carries this question_id.",
    "bad_image_path": "image_path is absolute or leaves the dataset root ('..').",
    "missing_image": "No file at root/image_path.",
    "corrupt_image": "The image file does not decode with Pillow.",
}

_REQUIRED = ("question_id", "question", "gt_answer", "image_path", "question_type")
_OPTION_KEYS = tuple(f"option_{letter}" for letter in LETTERS)
_SETTINGS_KEYS = (
    "split_seed",
    "train_fraction",
    "train_modality",
    "train_size",
    "test_per_modality",
    "sample_seed",
    "embed_images",
    "embed_size",
)


class CurationError(ValueError):
    """Input that curation cannot work with, explained with the fix."""


def _norm_key(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


_MODALITY_ALIASES: dict[str, str] = {
    **{_norm_key(raw): name for raw, name in OMNIMEDVQA_MODALITY_STRINGS.items()},
    **{_norm_key(name): name for name in MODALITIES},
    **{
        _norm_key(alias): name
        for alias, name in (
            ("MR", "MRI"),
            ("Magnetic Resonance Imaging", "MRI"),
            ("Computed Tomography", "CT"),
            ("Xray", "X-Ray"),
            ("Radiography", "X-Ray"),
            ("Ultrasonography", "Ultrasound"),
            ("Fundus Photography", "Fundus"),
            ("Optical Coherence Tomography", "OCT"),
            ("Microscopy Images", "Microscopy"),
        )
    },
}
_QUESTION_TYPES: dict[str, str] = {_norm_key(q): q for q in QUESTION_TYPES}


def normalize_modality(raw: str) -> str | None:
    """The paper's modality name for a raw modality string, or None when it is not one of eight."""
    return _MODALITY_ALIASES.get(_norm_key(raw))


def normalize_question_type(raw: str) -> str | None:
    """One of the five OmniMedVQA question types (case/spacing-insensitive), or None."""
    return _QUESTION_TYPES.get(_norm_key(raw))


def _answer_key(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kepo_version() -> str:
    try:
        return metadata.version("kepo")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


# ------------------------------------------------------------------------------ ingestion
@dataclass
class Ingested:
    """Every record of a root, checked: accepted `questions` rows (split unset) and rejects."""

    root: Path
    accepted: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    source_files: dict[str, str]  # QA JSON path relative to root -> sha256
    read: int


def qa_files(root: Path) -> list[Path]:
    """The QA JSON files of a root, sorted by name; a clear error when the layout is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise CurationError(
            f"{root}: no such folder; pass the dataset root (the OmniMedVQA folder)"
        )
    qa_dir = root / QA_SUBDIR
    if not (root / "QA_information").is_dir():
        raise CurationError(
            f"{root}: no QA_information/ folder here; pass the OmniMedVQA root that contains "
            "QA_information/ and Images/ (e.g. --root path/to/OmniMedVQA)"
        )
    if not qa_dir.is_dir():
        raise CurationError(
            f"{root}: QA_information/ has no Open-access/ folder; this release layout is not "
            "supported (expected QA_information/Open-access/<Dataset>.json)"
        )
    files = sorted(p for p in qa_dir.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise CurationError(f"{qa_dir}: no .json files; the QA_information download is incomplete")
    return files


def _load_records(path: Path, rel: str) -> list[Any]:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CurationError(
            f"{rel}: not valid JSON ({err}); restore the file from the release"
        ) from None
    if not isinstance(data, list):
        raise CurationError(
            f"{rel}: top level is a {type(data).__name__}, expected a JSON list of records"
        )
    return data


def _text(value: Any) -> str | None:
    """A field as text: numbers become strings; None, containers and blank strings become None."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    text = str(value) if isinstance(value, int | float) else value
    return text.strip() if isinstance(text, str) and text.strip() else None


@dataclass
class _Pending:
    """A record that passed the field checks, waiting for its image check."""

    rel_file: str
    index: int
    record: dict[str, Any]
    modality_raw: str
    row: dict[str, Any]


def _reject(
    rel_file: str,
    index: int,
    record: Any,
    reason: str,
    value: Any,
    qid: Any = None,
    mod: Any = None,
) -> dict[str, Any]:
    return {
        "source_file": rel_file,
        "record_index": index,
        "question_id": None if qid is None else str(qid),
        "modality_raw": None if mod is None else str(mod),
        "reason": reason,
        "offending_value": None if value is None else str(value),
        "record_json": json.dumps(record, ensure_ascii=False, sort_keys=True, default=str),
    }


def _check_fields(
    rel_file: str, index: int, record: Any, owners: dict[str, str]
) -> _Pending | dict[str, Any]:
    """Field checks of one record: a pending row, or a reject row."""
    if not isinstance(record, dict):
        return _reject(rel_file, index, record, "not_a_record", type(record).__name__)
    mod_key = "modality_type" if "modality_type" in record else "modality"
    raw_mod = _text(record.get(mod_key))
    qid = _text(record.get("question_id"))
    values = {k: _text(record.get(k)) for k in _REQUIRED}
    missing = [k for k, v in values.items() if v is None]
    if raw_mod is None:
        missing.append("modality_type")
    if missing:
        return _reject(rel_file, index, record, "missing_field", ",".join(missing), qid, raw_mod)
    assert raw_mod is not None and qid is not None
    modality = normalize_modality(raw_mod)
    if modality is None:
        return _reject(rel_file, index, record, "unknown_modality", raw_mod, qid, raw_mod)
    qtype = normalize_question_type(values["question_type"] or "")
    if qtype is None:
        return _reject(
            rel_file, index, record, "unknown_question_type", values["question_type"], qid, raw_mod
        )
    options: list[str] = []
    for key in _OPTION_KEYS:
        text = _text(record.get(key))
        if text is None:
            break
        options.append(text.strip())
    if len(options) < 2:
        return _reject(
            rel_file, index, record, "too_few_options", json.dumps(options), qid, raw_mod
        )
    gt = values["gt_answer"] or ""
    hits = [i for i, opt in enumerate(options) if _answer_key(opt) == _answer_key(gt)]
    if not hits:
        return _reject(rel_file, index, record, "gt_not_in_options", gt, qid, raw_mod)
    if len(hits) > 1:
        return _reject(rel_file, index, record, "gt_matches_several_options", gt, qid, raw_mod)
    image_source = record.get("image_source", "real")
    if image_source not in ("real", "synthetic"):
        return _reject(
            rel_file,
            index,
            record,
            "bad_field_value",
            f"image_source={image_source!r}",
            qid,
            raw_mod,
        )
    where = f"{rel_file}#{index}"
    if qid in owners:
        return _reject(
            rel_file,
            index,
            record,
            "duplicate_question_id",
            f"{qid} (first carried by {owners[qid]})",
            qid,
            raw_mod,
        )
    owners[qid] = where
    image_path = (values["image_path"] or "").strip().replace("\\", "/")
    parts = PurePosixPath(image_path).parts
    if (
        PurePosixPath(image_path).is_absolute()
        or ".." in parts
        or ":" in (parts[0] if parts else "")
    ):
        return _reject(rel_file, index, record, "bad_image_path", image_path, qid, raw_mod)
    row = {
        "question_id": qid,
        "dataset": PurePosixPath(rel_file).stem,
        "modality": modality,
        "question_type": qtype,
        "question": (values["question"] or "").strip(),
        "options": options,
        "gold_letter": LETTERS[hits[0]],
        "gold_text": options[hits[0]],
        "image_path": str(PurePosixPath(image_path)),
        "image_sha256": "",
        "image_width": 0,
        "image_height": 0,
        "image_bytes": None,
        "image_source": image_source,
        "split": None,
        "rationale": _text(record.get("rationale")),
        "reference_hint": _text(record.get("reference_hint")),
        "difficulty": _text(record.get("difficulty")),
        "source_file": rel_file,
    }
    return _Pending(rel_file, index, record, raw_mod, row)


@dataclass(frozen=True)
class ImageCheck:
    """An image file's sha256 and size, or the reason it cannot be used."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None  # missing_image / corrupt_image
    detail: str = ""


def inspect_image(path: Path) -> ImageCheck:
    """Hash the file and fully decode it with Pillow (truncated files pass `open` but not `load`)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ImageCheck(reason="missing_image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except Exception as err:  # Pillow raises many types for bad data; all mean "corrupt"
        return ImageCheck(reason="corrupt_image", detail=f"{type(err).__name__}: {err}")
    return ImageCheck(hashlib.sha256(data).hexdigest(), width, height)


def ingest(root: Path, *, workers: int = 4, progress: bool = False) -> Ingested:
    """Read and check every record under `root` (see the module docstring for the rules)."""
    root = Path(root)
    files = qa_files(root)
    owners: dict[str, str] = {}
    pending: list[_Pending] = []
    results: list[dict[str, Any] | _Pending] = []  # one outcome per record, in reading order
    source_files: dict[str, str] = {}
    read = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        source_files[rel] = sha256_file(path)
        for index, record in enumerate(_load_records(path, rel)):
            outcome = _check_fields(rel, index, record, owners)
            results.append(outcome)
            read += 1
            if isinstance(outcome, _Pending):
                pending.append(outcome)
    unique_paths = sorted({p.row["image_path"] for p in pending})
    checked = dict(
        zip(
            unique_paths,
            _map_with_progress(
                lambda rel_path: inspect_image(root / rel_path),
                unique_paths,
                workers=workers,
                progress=progress,
                label="checking images",
            ),
            strict=True,
        )
    )
    accepted: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for outcome in results:
        if isinstance(outcome, dict):
            rejects.append(outcome)
            continue
        check = checked[outcome.row["image_path"]]
        if check.reason is not None:
            value = outcome.row["image_path"] + (f": {check.detail}" if check.detail else "")
            rejects.append(
                _reject(
                    outcome.rel_file,
                    outcome.index,
                    outcome.record,
                    check.reason,
                    value,
                    outcome.row["question_id"],
                    outcome.modality_raw,
                )
            )
            continue
        row = outcome.row
        row["image_sha256"], row["image_width"], row["image_height"] = (
            check.sha256,
            check.width,
            check.height,
        )
        accepted.append(row)
    log.info(
        "%s: read %d records, accepted %d, rejected %d", root, read, len(accepted), len(rejects)
    )
    return Ingested(root, accepted, rejects, source_files, read)


def _map_with_progress(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    progress: bool,
    label: str,
) -> list[Any]:
    """`[fn(x) for x in items]` on a thread pool (I/O bound), with progress shown when asked."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it: Iterable[Any] = pool.map(fn, items)
        out = []
        with kepo.progress.progress(len(items), label, unit="images", enabled=progress) as advance:
            for value in it:
                out.append(value)
                advance()
        return out


# ------------------------------------------------------------------------------ protocol
def split_by_image(
    rows: Sequence[Mapping[str, Any]], *, seed: int, train_fraction: float
) -> dict[str, str]:
    """image sha256 -> 'train' | 'test', per home modality (see the module docstring)."""
    home: dict[str, str] = {}
    for row in rows:
        home.setdefault(row["image_sha256"], row["modality"])
    parts: dict[str, str] = {}
    for i, modality in enumerate(MODALITIES):
        images = sorted(sha for sha, m in home.items() if m == modality)
        n_train = math.floor(train_fraction * len(images) + 0.5)
        order = np.random.default_rng([seed, i]).permutation(len(images))
        for rank, idx in enumerate(order):
            parts[images[idx]] = "train" if rank < n_train else "test"
    return parts


def _draw(pool: list[dict[str, Any]], size: int, rng_key: list[int]) -> list[dict[str, Any]]:
    pool = sorted(pool, key=lambda r: r["question_id"])
    if len(pool) <= size:
        return pool
    idx = np.random.default_rng(rng_key).choice(len(pool), size=size, replace=False)
    return [pool[i] for i in sorted(idx.tolist())]


def draw_samples(
    rows: Sequence[dict[str, Any]], parts: Mapping[str, str], cfg: CurationConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, int]]]:
    """(train sample, test sample, shortfalls) from the split parts (see the module docstring)."""
    shortfalls: dict[str, dict[str, int]] = {}
    train_pool = [
        r
        for r in rows
        if r["modality"] == cfg.train_modality and parts[r["image_sha256"]] == "train"
    ]
    train = [
        dict(r, split="train") for r in _draw(train_pool, cfg.train_size, [cfg.sample_seed, 0])
    ]
    if len(train_pool) < cfg.train_size:
        shortfalls[f"train/{cfg.train_modality}"] = {
            "requested": cfg.train_size,
            "available": len(train_pool),
        }
    test: list[dict[str, Any]] = []
    for i, modality in enumerate(MODALITIES):
        pool = [r for r in rows if r["modality"] == modality and parts[r["image_sha256"]] == "test"]
        test += [
            dict(r, split="test")
            for r in _draw(pool, cfg.test_per_modality, [cfg.sample_seed, 1, i])
        ]
        if len(pool) < cfg.test_per_modality:
            shortfalls[f"test/{modality}"] = {
                "requested": cfg.test_per_modality,
                "available": len(pool),
            }
    return train, test, shortfalls


def embed_image(path: Path, size: int) -> bytes:
    """The image at `path`, RGB, resized to size x size (bicubic), as PNG bytes."""
    with Image.open(path) as im:
        img = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ writing
def to_table(table: Table, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows cast to the declared arrow schema and validated with the table's pandera schema."""
    tbl = pa.Table.from_pylist(list(rows), schema=table.arrow_schema())
    table.pandera_schema().validate(tbl)
    return tbl


def _write_parquet(tbl: pa.Table, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(tbl, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def _sort_key(row: Mapping[str, Any]) -> tuple[int, str]:
    return (MODALITIES.index(row["modality"]), row["question_id"])


@dataclass(frozen=True)
class CurationResult:
    """What one curation produced: output paths and the counts printed by the command."""

    out_dir: Path
    train_path: Path
    test_path: Path
    rejects_path: Path
    manifest_path: Path
    read: int
    accepted: int
    rejected: int
    per_modality: dict[str, dict[str, int]]
    per_reason: dict[str, int]
    shortfalls: dict[str, dict[str, int]]
    seconds: float
    reused: bool = False

    @classmethod
    def from_manifest(cls, out_dir: Path, *, reused: bool = True) -> CurationResult:
        out_dir = Path(out_dir)
        m = json.loads((out_dir / "manifest.json").read_text())
        c = m["counts"]
        return cls(
            out_dir=out_dir,
            train_path=out_dir / "train.parquet",
            test_path=out_dir / "test.parquet",
            rejects_path=out_dir / "rejects.parquet",
            manifest_path=out_dir / "manifest.json",
            read=c["read"],
            accepted=c["accepted"],
            rejected=c["rejected"],
            per_modality=c["per_modality"],
            per_reason=c["per_reason"],
            shortfalls=m["shortfalls"],
            seconds=0.0,
            reused=reused,
        )


def _counts(
    ing: Ingested,
    parts: Mapping[str, str],
    train: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    names = [*MODALITIES, UNKNOWN_MODALITY]
    keys = (
        "read",
        "accepted",
        "rejected",
        "train_part",
        "test_part",
        "train_sample",
        "test_sample",
    )
    per: dict[str, dict[str, int]] = {m: dict.fromkeys(keys, 0) for m in names}
    images: dict[str, set[str]] = {m: set() for m in MODALITIES}
    real: dict[str, set[str]] = {m: set() for m in MODALITIES}
    real_sampled: dict[str, set[str]] = {m: set() for m in MODALITIES}
    for r in ing.accepted:
        m = r["modality"]
        per[m]["accepted"] += 1
        per[m][f"{parts[r['image_sha256']]}_part"] += 1
        images[m].add(r["image_sha256"])
        if r["image_source"] == "real":
            real[m].add(r["image_sha256"])
    for r in ing.rejects:
        m = normalize_modality(r["modality_raw"] or "") or UNKNOWN_MODALITY
        per[m]["rejected"] += 1
    for rows, key in ((train, "train_sample"), (test, "test_sample")):
        for r in rows:
            per[r["modality"]][key] += 1
            if r["image_source"] == "real":
                real_sampled[r["modality"]].add(r["image_sha256"])
    for m in names:
        per[m]["read"] = per[m]["accepted"] + per[m]["rejected"]
        if m in images:
            per[m]["images"] = len(images[m])
            per[m]["real_images"] = len(real[m])
            per[m]["real_images_sampled"] = len(real_sampled[m])
    if per[UNKNOWN_MODALITY]["read"] == 0:
        del per[UNKNOWN_MODALITY]
    reasons = Counter(r["reason"] for r in ing.rejects)
    return {
        "read": ing.read,
        "accepted": len(ing.accepted),
        "rejected": len(ing.rejects),
        "per_modality": per,
        "per_reason": {k: reasons[k] for k in REJECT_REASONS if reasons[k]},
        "real_image_modalities": sum(1 for m in MODALITIES if real[m]),
    }


def curation_settings(cfg: CurationConfig, *, source: str, root: Path | None) -> dict[str, Any]:
    """The settings that determine the output (compared by `curation_status`)."""
    settings: dict[str, Any] = {"source": source, "manifest_version": MANIFEST_VERSION}
    settings.update(cfg.model_dump(mode="json", include=set(_SETTINGS_KEYS)))
    if source == "bundled":
        settings["bundled"] = cfg.bundled.model_dump(mode="json")
        settings["bundled_format"] = BUNDLED_FORMAT_VERSION
        settings["kepo_version"] = kepo_version()
    elif root is not None:
        settings["root"] = str(Path(root).resolve())
    return settings


def _curate(
    root: Path, out_dir: Path, cfg: CurationConfig, *, source: str, progress: bool
) -> CurationResult:
    t0 = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    ing = ingest(root, workers=cfg.image_workers, progress=progress)
    if not ing.accepted:
        log.warning("%s: no record was accepted; see rejects.parquet for the reasons", root)
    parts = split_by_image(ing.accepted, seed=cfg.split_seed, train_fraction=cfg.train_fraction)
    train, test, shortfalls = draw_samples(ing.accepted, parts, cfg)
    for key, s in shortfalls.items():
        log.warning(
            "%s: requested %d items, only %d available; took them all",
            key,
            s["requested"],
            s["available"],
        )
    train.sort(key=_sort_key)
    test.sort(key=_sort_key)
    # The whole train part of every modality (not a sample): for warm-up / SFT on other
    # modalities. It never shares an image with test, by construction of the split.
    pool = sorted(
        (dict(r, split="train") for r in ing.accepted if parts[r["image_sha256"]] == "train"),
        key=_sort_key,
    )
    if cfg.embed_images:
        for rows in (train, test, pool):
            blobs = _map_with_progress(
                lambda r: embed_image(root / r["image_path"], cfg.embed_size),
                rows,
                workers=cfg.image_workers,
                progress=progress,
                label="embedding images",
            )
            for r, blob in zip(rows, blobs, strict=True):
                r["image_bytes"] = blob
    train_tbl, test_tbl = to_table(QUESTIONS, train), to_table(QUESTIONS, test)
    pool_tbl = to_table(QUESTIONS, pool)
    rejects_tbl = to_table(REJECTS, ing.rejects)

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # no manifest while outputs are being replaced
    outputs = {
        "train.parquet": _write_parquet(train_tbl, out_dir / "train.parquet"),
        "test.parquet": _write_parquet(test_tbl, out_dir / "test.parquet"),
        "rejects.parquet": _write_parquet(rejects_tbl, out_dir / "rejects.parquet"),
        "pool.parquet": _write_parquet(pool_tbl, out_dir / "pool.parquet"),
    }
    counts = _counts(ing, parts, train, test)
    try:
        dataset_root = Path(os.path.relpath(root.resolve(), out_dir.resolve()))
        dataset_root_str = dataset_root.as_posix() if ".." not in dataset_root.parts else None
    except ValueError:  # different drives
        dataset_root_str = None
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kepo_version": kepo_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "dataset_root": dataset_root_str or str(root.resolve()),
        "source_files": ing.source_files,
        "settings": curation_settings(cfg, source=source, root=root),
        "seeds": {"split_seed": cfg.split_seed, "sample_seed": cfg.sample_seed},
        "sizes": {
            "train_modality": cfg.train_modality,
            "train_size": cfg.train_size,
            "test_per_modality": cfg.test_per_modality,
            "train_fraction": cfg.train_fraction,
        },
        "counts": counts,
        "shortfalls": shortfalls,
        "outputs": outputs,
    }
    tmp = manifest_path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, manifest_path)
    seconds = time.perf_counter() - t0
    log.info(
        "curated %s -> %s: %d train, %d test, %d rejects (%.1f s)",
        root,
        out_dir,
        len(train),
        len(test),
        len(ing.rejects),
        seconds,
    )
    return CurationResult(
        out_dir=out_dir,
        train_path=out_dir / "train.parquet",
        test_path=out_dir / "test.parquet",
        rejects_path=out_dir / "rejects.parquet",
        manifest_path=manifest_path,
        read=counts["read"],
        accepted=counts["accepted"],
        rejected=counts["rejected"],
        per_modality=counts["per_modality"],
        per_reason=counts["per_reason"],
        shortfalls=shortfalls,
        seconds=seconds,
    )


def curate_omnimedvqa(
    root: Path, out_dir: Path, cfg: CurationConfig, *, progress: bool = False
) -> CurationResult:
    """Curate an OmniMedVQA-layout folder into `out_dir` (the paper's protocol by default)."""
    qa_files(root)  # fail at once on a wrong root, before anything is written
    return _curate(Path(root), Path(out_dir), cfg, source="omnimedvqa", progress=progress)


def curate_bundled(out_dir: Path, cfg: CurationConfig, *, progress: bool = False) -> CurationResult:
    """Build MiniMedVQA into out_dir/source (OmniMedVQA layout), then curate it like OmniMedVQA."""
    t0 = time.perf_counter()
    source = build_bundled(Path(out_dir) / "source", cfg.bundled)
    result = _curate(source, Path(out_dir), cfg, source="bundled", progress=progress)
    return replace(result, seconds=time.perf_counter() - t0)  # build included


def curate(cfg: CurationConfig, *, progress: bool = False) -> CurationResult:
    """Curate what `cfg` names: cfg.source from cfg.root (omnimedvqa) into cfg.out_dir."""
    if cfg.source == "bundled":
        return curate_bundled(cfg.out_dir, cfg, progress=progress)
    if cfg.root is None:
        raise CurationError(
            "data.root is not set: source=omnimedvqa needs the OmniMedVQA folder (data.root or --root)"
        )
    return curate_omnimedvqa(cfg.root, cfg.out_dir, cfg, progress=progress)


# ------------------------------------------------------------------------------ reuse
@dataclass(frozen=True)
class CurationStatus:
    """Whether out_dir already holds this curation, and why (or why not)."""

    current: bool
    reason: str


def curation_status(cfg: CurationConfig) -> CurationStatus:
    """Compare cfg.out_dir's manifest with the current source hashes and settings.

    Current when the manifest's settings equal those `cfg` asks for, its source-file sha256s
    equal those of the QA JSON files now under the root (for bundled data: the folder it built,
    whose content the settings determine), and every output file still has its recorded sha256.
    Image files are not re-hashed: a changed image under unchanged QA files goes unnoticed.
    """
    out_dir = Path(cfg.out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return CurationStatus(False, f"no manifest in {out_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return CurationStatus(False, f"{manifest_path} is not valid JSON")
    if cfg.source == "bundled":
        root: Path | None = out_dir / "source"
    else:
        root = cfg.root
        if root is None:
            raise CurationError(
                "data.root is not set: source=omnimedvqa needs the OmniMedVQA folder"
            )
    wanted = curation_settings(cfg, source=cfg.source, root=root)
    if manifest.get("settings") != wanted:
        old = manifest.get("settings") or {}
        changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        return CurationStatus(False, f"settings changed: {', '.join(changed)}")
    try:
        current = {p.relative_to(root).as_posix(): sha256_file(p) for p in qa_files(root)}
    except CurationError as err:
        return CurationStatus(False, f"source unreadable: {err}")
    if current != manifest.get("source_files"):
        return CurationStatus(False, "source QA files changed (sha256 differs)")
    for name, sha in (manifest.get("outputs") or {}).items():
        path = out_dir / name
        if not path.is_file() or sha256_file(path) != sha:
            return CurationStatus(False, f"output {name} is missing or was modified")
    return CurationStatus(True, "manifest source hashes, settings and outputs match")


def ensure_curated(cfg: CurationConfig, *, progress: bool = False) -> CurationResult:
    """cfg.out_dir's curation when `curation_status` says it is current, else a fresh one."""
    status = curation_status(cfg)
    if status.current:
        log.info("reusing curated data in %s: %s", cfg.out_dir, status.reason)
        return CurationResult.from_manifest(cfg.out_dir, reused=True)
    log.info("curating into %s (%s)", cfg.out_dir, status.reason)
    return curate(cfg, progress=progress)
