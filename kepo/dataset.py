"""Reading a curated dataset back: the questions Parquet files and their images.

A curated folder (written by `kepo.curate`) holds train.parquet, test.parquet, pool.parquet
(schema `questions`), rejects.parquet and manifest.json, written last. Every stage that needs
questions or images (rollout, training, evaluation, warm-up, the study) reads them through
`QuestionSet`; nothing here writes.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas.tables import QUESTIONS


class DatasetError(ValueError):
    """A curated folder that cannot be read as it is, explained with the fix."""


def read_questions(path: Path | str) -> pa.Table:
    """A curated train/test Parquet file, checked against the `questions` schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; run `kepo curate bundled` or `kepo curate omnimedvqa`"
        )
    tbl = pq.read_table(path)
    if tbl.schema.names != QUESTIONS.column_names:
        raise DatasetError(
            f"{path}: columns {tbl.schema.names} differ from the questions schema; re-run kepo curate"
        )
    tbl = tbl.cast(QUESTIONS.arrow_schema())
    QUESTIONS.pandera_schema().validate(tbl)
    return tbl


def load_image(row: Mapping[str, Any], root: Path | str | None = None) -> Image.Image:
    """The RGB image of a question row: its embedded bytes, else root/image_path.

    `root` is the dataset root recorded in the curated folder's manifest.json (`QuestionSet`
    resolves it for you). Embedded images are already resized; files are returned as stored.
    """
    data = row.get("image_bytes")
    if data:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    qid = row.get("question_id")
    if root is None:
        raise DatasetError(
            f"question {qid}: no embedded image and no dataset root; pass root= (manifest.json's "
            "dataset_root) or curate with --embed-images"
        )
    path = Path(root) / row["image_path"]
    if not path.is_file():
        raise FileNotFoundError(
            f"question {qid}: image {path} not found; the dataset root moved or was deleted — "
            "restore it or re-curate (--embed-images makes the Parquet self-contained)"
        )
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class QuestionSet:
    """A curated folder: `.train` / `.test` tables, `.manifest`, and `.image(question_id)`.

    >>> qs = QuestionSet("data/minimedvqa")
    >>> row = qs.row(qs.test["question_id"][0].as_py()); img = qs.image(row["question_id"])
    """

    curated_dir: Path
    cache_size: int = 256
    _cache: OrderedDict[str, Image.Image] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        self.curated_dir = Path(self.curated_dir)
        if not (self.curated_dir / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{self.curated_dir}: no manifest.json; curate first (kepo curate bundled --out "
                f"{self.curated_dir})"
            )

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.curated_dir / "manifest.json").read_text())

    @cached_property
    def root(self) -> Path:
        """The dataset root images are read from (relative manifest paths resolve here)."""
        root = Path(self.manifest["dataset_root"])
        return root if root.is_absolute() else self.curated_dir / root

    @cached_property
    def train(self) -> pa.Table:
        return read_questions(self.curated_dir / "train.parquet")

    @cached_property
    def test(self) -> pa.Table:
        return read_questions(self.curated_dir / "test.parquet")

    @cached_property
    def pool(self) -> pa.Table:
        """The whole train part of every modality (train is a sample of its in-domain part)."""
        path = self.curated_dir / "pool.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; re-curate this folder with this kepo version"
            )
        return read_questions(path)

    @cached_property
    def rejects(self) -> pa.Table:
        return pq.read_table(self.curated_dir / "rejects.parquet")

    @cached_property
    def _index(self) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for split in ("train", "test"):
            for i, qid in enumerate(getattr(self, split).column("question_id").to_pylist()):
                index[qid] = (split, i)
        if (self.curated_dir / "pool.parquet").is_file():
            for i, qid in enumerate(self.pool.column("question_id").to_pylist()):
                index.setdefault(qid, ("pool", i))
        return index

    def row(self, question_id: str) -> dict[str, Any]:
        """One question as a dict of column values."""
        try:
            split, i = self._index[question_id]
        except KeyError:
            raise KeyError(
                f"question {question_id!r} is in neither train nor test of {self.curated_dir}"
            ) from None
        return getattr(self, split).slice(i, 1).to_pylist()[0]

    def image(self, question_id: str) -> Image.Image:
        """The question's RGB image (a copy; the most recent `cache_size` images are cached)."""
        img = self._cache.get(question_id)
        if img is None:
            img = load_image(self.row(question_id), self.root)
            self._cache[question_id] = img
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(question_id)
        return img.copy()
