"""OmniMedVQA ingestion: every quirk of the release, rejects with reasons, split and samples."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from kepo.commands.curate import app as curate_app
from kepo.config import CurationConfig
from kepo.curate import (
    REJECT_REASONS,
    CurationError,
    curate_omnimedvqa,
    curation_status,
    ingest,
)
from kepo.dataset import DatasetError, QuestionSet, load_image, read_questions
from kepo.omnimedvqa import OMNIMEDVQA_MODALITY_STRINGS
from schemas.tables import MODALITIES, QUESTIONS, REJECTS

RAW = {name: raw for raw, name in OMNIMEDVQA_MODALITY_STRINGS.items()}


def _png(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _record(qid: str, modality: str, image: str, **extra: Any) -> dict[str, Any]:
    rec = {
        "dataset": "Fixture",
        "question_id": qid,
        "question_type": "Modality Recognition",
        "question": "Which modality is this?",
        "gt_answer": "MRI",
        "image_path": image,
        "option_A": "CT",
        "option_B": "MRI",
        "option_C": "X-Ray",
        "option_D": "Ultrasound",
        "modality_type": RAW[modality],
    }
    rec.update(extra)
    return rec


def _write(root: Path, files: dict[str, list[Any]], images: dict[str, bytes]) -> Path:
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        (qa / f"{name}.json").write_text(json.dumps(records))
    for rel, data in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# Every quirk of the release, one record each; the expected outcome of each is listed here.
GOOD = "Images/Quirks/good_{}.png"


def quirks_fixture(root: Path) -> tuple[Path, dict[str, str | None]]:
    """(root, question_id -> expected reject reason or None for accepted)."""
    images = {GOOD.format(i): _png(i) for i in range(12)}
    images["Images/Quirks/corrupt.png"] = b"this is not an image"
    images["Images/Quirks/truncated.png"] = _png(99, 64)[:200]
    images["Images/Quirks/copy_of_good_0.png"] = images[GOOD.format(0)]  # same bytes, other path
    two = _record(
        "q-two-options", "CT", GOOD.format(1), gt_answer="Yes", option_A="No", option_B="Yes"
    )
    for k in ("option_C", "option_D"):
        del two[k]
    three = _record("q-three-options", "X-Ray", GOOD.format(2), option_D=None)
    three.pop("option_D")
    modality_key = _record("q-modality-key", "MRI", GOOD.format(3))
    modality_key["modality"] = modality_key.pop("modality_type")
    records_a = [
        two,
        three,
        modality_key,
        _record("q-gt-case", "MRI", GOOD.format(4), gt_answer="mri"),
        _record("q-gt-period", "MRI", GOOD.format(5), gt_answer="MRI."),
        _record("q-gt-none", "MRI", GOOD.format(6), gt_answer="PET"),
        _record("q-missing-image", "CT", "Images/Quirks/absent.png"),
        _record("q-corrupt", "CT", "Images/Quirks/corrupt.png"),
        _record("q-truncated", "CT", "Images/Quirks/truncated.png"),
        _record("q-dup", "Fundus", GOOD.format(7)),
        _record("q-dup", "Fundus", GOOD.format(8)),
        _record(
            "q-unknown-modality", "MRI", GOOD.format(9), modality_type="PET (Positron Emission)"
        ),
        _record("q-unknown-type", "MRI", GOOD.format(9), question_type="Counting"),
        _record("q-one-option", "MRI", GOOD.format(9), option_B=None, gt_answer="CT"),
        _record("q-no-gt", "MRI", GOOD.format(9), gt_answer=None),
        _record("q-escape", "MRI", "../outside.png"),
        _record("q-gt-twice", "MRI", GOOD.format(9), option_C="mri"),
        _record("q-bad-source", "MRI", GOOD.format(9), image_source="cartoon"),
        ["not", "a", "record"],
    ]
    # the eight verbatim modality strings, odd parentheses and all, each on its own image
    records_b = [
        _record(f"q-verbatim-{i}", m, GOOD.format(i + 10) if i < 2 else GOOD.format(0))
        for i, m in enumerate(MODALITIES)
    ]
    records_b.append(_record("q-same-bytes", "MRI", "Images/Quirks/copy_of_good_0.png"))
    expected: dict[str, str | None] = {
        "q-two-options": None,
        "q-three-options": None,
        "q-modality-key": None,
        "q-gt-case": None,
        "q-gt-period": None,
        "q-gt-none": "gt_not_in_options",
        "q-missing-image": "missing_image",
        "q-corrupt": "corrupt_image",
        "q-truncated": "corrupt_image",
        "q-unknown-modality": "unknown_modality",
        "q-unknown-type": "unknown_question_type",
        "q-one-option": "too_few_options",
        "q-no-gt": "missing_field",
        "q-escape": "bad_image_path",
        "q-gt-twice": "gt_matches_several_options",
        "q-bad-source": "bad_field_value",
        "q-same-bytes": None,
        **{f"q-verbatim-{i}": None for i in range(len(MODALITIES))},
    }
    _write(root, {"Quirks A": records_a, "Verbatim B": records_b}, images)
    return root, expected


def test_every_quirk_is_accepted_or_rejected_with_its_reason(tmp_path: Path) -> None:
    root, expected = quirks_fixture(tmp_path / "OmniMedVQA")
    out = tmp_path / "curated"
    res = curate_omnimedvqa(
        root, out, CurationConfig(train_size=5, test_per_modality=5, split_seed=1)
    )
    n_records = 19 + 9
    assert res.read == n_records == res.accepted + res.rejected

    rejects = pq.read_table(out / "rejects.parquet")
    REJECTS.pandera_schema().validate(rejects)
    by_qid: dict[str | None, list[dict[str, Any]]] = {}
    for r in rejects.to_pylist():
        by_qid.setdefault(r["question_id"], []).append(r)
    for qid, reason in expected.items():
        if reason is None:
            assert qid not in by_qid, f"{qid} should be accepted, got {by_qid.get(qid)}"
        else:
            assert [r["reason"] for r in by_qid[qid]] == [reason], qid
            assert set(REJECT_REASONS) >= {reason}
    # the second q-dup (record 10 of file A) is the duplicate; the first is accepted
    (dup,) = by_qid["q-dup"]
    assert dup["reason"] == "duplicate_question_id" and dup["record_index"] == 10
    assert "Quirks A.json#9" in dup["offending_value"]
    (not_record,) = by_qid[None]
    assert not_record["reason"] == "not_a_record" and not_record["record_index"] == 18
    # offending values carry the bad value itself
    assert by_qid["q-gt-none"][0]["offending_value"] == "PET"
    assert by_qid["q-unknown-modality"][0]["offending_value"] == "PET (Positron Emission)"
    assert by_qid["q-unknown-modality"][0]["modality_raw"] == "PET (Positron Emission)"
    assert by_qid["q-missing-image"][0]["offending_value"] == "Images/Quirks/absent.png"
    assert by_qid["q-no-gt"][0]["offending_value"] == "gt_answer"
    assert json.loads(by_qid["q-gt-none"][0]["record_json"])["question_id"] == "q-gt-none"
    assert len(rejects) == sum(r is not None for r in expected.values()) + 2  # + dup, not_a_record

    # accepted records: letters and normalised modalities
    acc = {r["question_id"]: r for r in ingest(root).accepted}
    assert set(acc) == {q for q, r in expected.items() if r is None} | {"q-dup"}
    assert (
        acc["q-two-options"]["options"] == ["No", "Yes"]
        and acc["q-two-options"]["gold_letter"] == "B"
    )
    assert acc["q-three-options"]["options"] == ["CT", "MRI", "X-Ray"]
    assert acc["q-modality-key"]["modality"] == "MRI"
    assert acc["q-gt-case"]["gold_letter"] == "B" and acc["q-gt-case"]["gold_text"] == "MRI"
    assert acc["q-gt-period"]["gold_letter"] == "B"
    assert [acc[f"q-verbatim-{i}"]["modality"] for i in range(8)] == list(MODALITIES)
    assert acc["q-same-bytes"]["image_sha256"] == acc["q-verbatim-2"]["image_sha256"]
    assert acc["q-gt-case"]["image_width"] == 14 and acc["q-gt-case"]["image_height"] == 12

    # per-modality counts add up and match the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    per = manifest["counts"]["per_modality"]
    assert sum(c["read"] for c in per.values()) == n_records
    for counts in per.values():
        assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert per["(unknown)"]["rejected"] == 2  # the PET record and the non-record
    assert manifest["counts"]["per_reason"]["corrupt_image"] == 2
    assert set(manifest["source_files"]) == {
        "QA_information/Open-access/Quirks A.json",
        "QA_information/Open-access/Verbatim B.json",
    }


def test_a_root_without_qa_information_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "Images").mkdir()
    with pytest.raises(CurationError, match="no QA_information"):
        curate_omnimedvqa(tmp_path, tmp_path / "out", CurationConfig())
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        curate_app, ["omnimedvqa", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "QA_information" in result.output


def test_cli_prints_counts_per_modality_and_reason(tmp_path: Path) -> None:
    root, _ = quirks_fixture(tmp_path / "OmniMedVQA")
    out = tmp_path / "curated"
    result = CliRunner().invoke(
        curate_app,
        [
            "omnimedvqa",
            "--root",
            str(root),
            "--out",
            str(out),
            "--train-size",
            "3",
            "--test-per-modality",
            "2",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "Rejects per reason" in result.output and "corrupt_image" in result.output
    assert "read 28 = accepted 15 + rejected 13 (ok)" in result.output
    assert "Fundus" in result.output and "(unknown)" in result.output


# ------------------------------------------------------------------------------ protocol
def protocol_fixture(root: Path, n_images: int = 14) -> Path:
    """Per modality n_images images; every third image has a second question; one image is
    shared by an MRI and a CT question (same bytes, two paths)."""
    files: dict[str, list[Any]] = {}
    images: dict[str, bytes] = {}
    for mi, m in enumerate(MODALITIES):
        recs = []
        for i in range(n_images):
            path = f"Images/{m}/{i}.png"
            images[path] = _png(1000 * mi + i)
            recs.append(_record(f"{m}-{i}-a", m, path))
            if i % 3 == 0:
                recs.append(_record(f"{m}-{i}-b", m, path, question_type="Anatomy Identification"))
        files[f"Set {m}"] = recs
    images["Images/shared/ct_copy.png"] = images["Images/MRI/1.png"]
    files["Set CT"].append(_record("CT-shared", "CT", "Images/shared/ct_copy.png"))
    return _write(root, files, images)


def _expected_split(rows: list[dict[str, Any]], seed: int, fraction: float) -> dict[str, str]:
    """The documented split, written out independently of the library."""
    home: dict[str, str] = {}
    for r in rows:
        home.setdefault(r["image_sha256"], r["modality"])
    parts = {}
    for i, m in enumerate(MODALITIES):
        shas = sorted(s for s, hm in home.items() if hm == m)
        perm = np.random.default_rng([seed, i]).permutation(len(shas))
        n_train = math.floor(fraction * len(shas) + 0.5)
        for rank, j in enumerate(perm):
            parts[shas[j]] = "train" if rank < n_train else "test"
    return parts


def _expected_sample(pool: list[dict[str, Any]], size: int, key: list[int]) -> set[str]:
    ids = sorted(r["question_id"] for r in pool)
    if len(ids) <= size:
        return set(ids)
    return {ids[i] for i in np.random.default_rng(key).choice(len(ids), size=size, replace=False)}


def test_split_and_samples_follow_the_recorded_seeds(tmp_path: Path) -> None:
    root = protocol_fixture(tmp_path / "src")
    out = tmp_path / "curated"
    cfg = CurationConfig(
        split_seed=7, sample_seed=11, train_size=6, test_per_modality=3, train_modality="CT"
    )
    curate_omnimedvqa(root, out, cfg)
    qs = QuestionSet(out)
    m = qs.manifest
    seed, sample_seed = m["seeds"]["split_seed"], m["seeds"]["sample_seed"]
    sizes = m["sizes"]
    assert (seed, sample_seed, sizes["train_size"], sizes["train_modality"]) == (7, 11, 6, "CT")

    rows = ingest(root).accepted
    parts = _expected_split(rows, seed, sizes["train_fraction"])
    train_pool = [r for r in rows if r["modality"] == "CT" and parts[r["image_sha256"]] == "train"]
    want_train = _expected_sample(train_pool, sizes["train_size"], [sample_seed, 0])
    assert set(qs.train.column("question_id").to_pylist()) == want_train
    assert len(want_train) == 6
    test_ids = qs.test.column("question_id").to_pylist()
    for i, mod in enumerate(MODALITIES):
        pool = [r for r in rows if r["modality"] == mod and parts[r["image_sha256"]] == "test"]
        want = _expected_sample(pool, sizes["test_per_modality"], [sample_seed, 1, i])
        got = {
            q
            for q, mm in zip(test_ids, qs.test.column("modality").to_pylist(), strict=True)
            if mm == mod
        }
        assert got == want, mod
        counts = m["counts"]["per_modality"][mod]
        assert counts["test_part"] == len(pool) and counts["test_sample"] == len(want)
    # the 80/20 split is by image: 14 images per modality (15 homed in MRI) -> 11 (12) train
    per = m["counts"]["per_modality"]
    assert per["Fundus"]["train_part"] + per["Fundus"]["test_part"] == 19
    # a different seed gives a different split: the seed is really used
    curate_omnimedvqa(root, tmp_path / "other", cfg.model_copy(update={"split_seed": 8}))
    other = QuestionSet(tmp_path / "other")
    assert set(other.test.column("question_id").to_pylist()) != set(test_ids)


def test_train_and_test_share_no_question_and_no_image(tmp_path: Path) -> None:
    root = protocol_fixture(tmp_path / "src", n_images=10)
    shared_in_train: list[bool] = []
    for seed in range(4):  # several splits: the shared MRI/CT image must never straddle them
        out = tmp_path / f"c{seed}"
        curate_omnimedvqa(
            root, out, CurationConfig(split_seed=seed, train_size=100, test_per_modality=100)
        )
        qs = QuestionSet(out)
        train_ids, test_ids = (
            set(t.column("question_id").to_pylist()) for t in (qs.train, qs.test)
        )
        train_sha, test_sha = (
            set(t.column("image_sha256").to_pylist()) for t in (qs.train, qs.test)
        )
        assert not train_ids & test_ids and not train_sha & test_sha
        # the image shared by MRI-1-a and CT-shared: never one in train and the other in test
        assert not ("MRI-1-a" in train_ids and "CT-shared" in test_ids)
        shared_in_train.append("MRI-1-a" in train_ids)
        assert len(train_ids) == qs.manifest["counts"]["per_modality"]["MRI"]["train_part"]
        # the pool (whole train part, every modality) is disjoint from test and holds train
        pool_ids = set(qs.pool.column("question_id").to_pylist())
        pool_sha = set(qs.pool.column("image_sha256").to_pylist())
        assert not pool_ids & test_ids and not pool_sha & test_sha and train_ids <= pool_ids
        assert len(pool_ids) == sum(
            m["train_part"] for m in qs.manifest["counts"]["per_modality"].values()
        )
    assert any(shared_in_train)  # some split put the shared image in train: the check bit


def test_shortfalls_take_everything_and_are_recorded(tmp_path: Path) -> None:
    root = protocol_fixture(tmp_path / "src", n_images=5)
    res = curate_omnimedvqa(
        root, tmp_path / "c", CurationConfig(train_size=600, test_per_modality=300)
    )
    m = json.loads(res.manifest_path.read_text())
    assert m["shortfalls"]["train/MRI"]["requested"] == 600
    assert (
        m["shortfalls"]["train/MRI"]["available"]
        == m["counts"]["per_modality"]["MRI"]["train_part"]
    )
    assert m["shortfalls"]["test/OCT"] == {
        "requested": 300,
        "available": m["counts"]["per_modality"]["OCT"]["test_part"],
    }
    assert (
        m["counts"]["per_modality"]["MRI"]["train_sample"]
        == m["counts"]["per_modality"]["MRI"]["train_part"]
    )


# ------------------------------------------------------------------------------ reading back
def test_question_set_images_paths_and_embedded(tmp_path: Path) -> None:
    root = protocol_fixture(tmp_path / "src", n_images=5)
    out = tmp_path / "c"
    curate_omnimedvqa(root, out, CurationConfig(train_size=3, test_per_modality=2))
    qs = QuestionSet(out)
    qid = qs.test.column("question_id")[0].as_py()
    row = qs.row(qid)
    img = qs.image(qid)
    with Image.open(root / row["image_path"]) as src:
        assert np.array_equal(np.asarray(img), np.asarray(src.convert("RGB")))
    assert qs.image(qid) is not qs.image(qid)  # copies, so callers cannot spoil the cache
    with pytest.raises(KeyError, match="neither train nor test"):
        qs.row("nope")
    with pytest.raises(DatasetError, match="no embedded image"):
        load_image(row, None)

    emb = tmp_path / "emb"
    curate_omnimedvqa(
        root,
        emb,
        CurationConfig(train_size=3, test_per_modality=2, embed_images=True, embed_size=20),
    )
    tbl = read_questions(emb / "test.parquet")
    r0 = tbl.slice(0, 1).to_pylist()[0]
    assert load_image(r0).size == (20, 20)  # no root needed
    assert r0["image_width"] == 14  # the source size stays recorded


def test_read_questions_rejects_foreign_files(tmp_path: Path) -> None:
    import pyarrow as pa

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question_id": ["a"]}), bad)
    with pytest.raises(DatasetError, match="differ from the questions schema"):
        read_questions(bad)
    assert QUESTIONS.column_names[0] == "question_id"


def test_status_notices_a_changed_source_file(tmp_path: Path) -> None:
    root = protocol_fixture(tmp_path / "src", n_images=4)
    cfg = CurationConfig(
        source="omnimedvqa", root=root, out_dir=tmp_path / "c", train_size=2, test_per_modality=1
    )
    assert not curation_status(cfg).current
    curate_omnimedvqa(root, cfg.out_dir, cfg)
    assert curation_status(cfg).current
    assert (
        "settings changed: test_per_modality"
        in curation_status(cfg.model_copy(update={"test_per_modality": 2})).reason
    )
    qa = root / "QA_information" / "Open-access" / "Set OCT.json"
    records = json.loads(qa.read_text())
    records[0]["question"] = "Changed?"
    qa.write_text(json.dumps(records))
    assert curation_status(cfg).reason == "source QA files changed (sha256 differs)"
