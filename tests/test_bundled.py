"""MiniMedVQA: eight modalities, real images from wheels, deterministic, answers drawn in the image."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from kepo.bundled import (
    GRADES,
    QUADRANTS,
    REAL_SOURCES,
    STYLES,
    Canvas,
    _load_real,
    _render,
    _static_background,
    build_bundled,
)
from kepo.config import BundledDatasetConfig, CurationConfig, DifficultyConfig
from kepo.curate import BUNDLED_TEST_PER_MODALITY, BUNDLED_TRAIN_SIZE, curate_bundled
from kepo.dataset import QuestionSet, read_questions
from schemas.tables import MODALITIES, QUESTION_TYPES

SMALL = BundledDatasetConfig(synthetic_per_modality=12, real_variants_per_image=2, image_size=48)


def _small_cfg(**kw: object) -> CurationConfig:
    return CurationConfig(train_size=8, test_per_modality=4, bundled=SMALL, **kw)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minimed")
    curate_bundled(out, _small_cfg())
    return out


def test_covers_eight_modalities_with_the_configured_counts(small_build: Path) -> None:
    qs = QuestionSet(small_build)
    test_mods = Counter(qs.test.column("modality").to_pylist())
    assert test_mods == dict.fromkeys(MODALITIES, 4)
    assert qs.train.num_rows == 8 and set(qs.train.column("modality").to_pylist()) == {"MRI"}
    assert set(qs.train.column("split").to_pylist()) == {"train"}
    m = qs.manifest
    assert m["counts"]["rejected"] == 0 and m["counts"]["read"] == m["counts"]["accepted"]
    assert m["source"] == "bundled" and m["dataset_root"] == "source"
    for tbl in (qs.train, qs.test):  # read_questions validated them; check the extra fields
        for row in tbl.to_pylist():
            assert row["image_source"] in ("real", "synthetic")
            assert row["rationale"] and row["reference_hint"] and "<think>" not in row["rationale"]
            assert (row["difficulty"] is not None) == (row["image_source"] == "synthetic")
            assert row["options"][ord(row["gold_letter"]) - 65] == row["gold_text"]
    img = qs.image(qs.test.column("question_id")[0].as_py())
    assert img.size == (48, 48) and img.mode == "RGB"


def test_synthetic_questions_cover_all_five_types_per_modality(small_build: Path) -> None:
    qa = small_build / "source" / "QA_information" / "Open-access"
    for modality in MODALITIES:
        records = json.loads((qa / f"MiniMed Synthetic {modality}.json").read_text())
        assert {r["question_type"] for r in records} == set(QUESTION_TYPES), modality
        assert len({r["image_path"] for r in records}) == 12
        assert all(r["image_source"] == "synthetic" for r in records)


def test_at_least_six_modalities_have_real_images(small_build: Path) -> None:
    counts = QuestionSet(small_build).manifest["counts"]
    real = {m for m in MODALITIES if counts["per_modality"][m]["real_images"] > 0}
    assert real >= {"MRI", "CT", "X-Ray", "Ultrasound", "Fundus", "Microscopy"}
    assert counts["real_image_modalities"] == len(real) >= 6
    # 13 MRI frames (1 + 10 + 1 + 1) x 2 variants, each a distinct image
    assert counts["per_modality"]["MRI"]["real_images"] == 26


def test_real_labels_come_from_the_files_themselves() -> None:
    for source in REAL_SOURCES:
        bases = _load_real(source)
        assert bases, f"{source.name} did not load"
        declared = {
            k: v
            for k, v in (
                ("anatomy", source.anatomy),
                ("diagnosis", source.diagnosis),
                ("eye", source.eye),
            )
            if v
        }
        assert bases[0].labels == declared, source.name  # every label's evidence was found
        assert len(bases) == len(source.frames)
    right = {s.name: _load_real(s)[0].right_edge for s in REAL_SOURCES if s.package == "pydicom"}
    assert right["RG1_UNCR.dcm"] == "Patient's left"  # PatientOrientation ['L', 'F']
    assert right["RG3_UNCR.dcm"] == "Patient's right"  # PatientOrientation ['R', 'F']
    assert right["MR2_UNCR.dcm"] == "Posterior"  # ImageOrientationPatient row (0.57, 0.82, 0)
    assert (
        right["eCT_Supplemental.dcm"] == "Patient's right"
    )  # row (-1, 0, 0), in a functional group
    assert right["emri_small.dcm"] is None  # no orientation in the header: no such question


def test_a_flip_changes_the_orientation_answer(small_build: Path) -> None:
    qa = small_build / "source" / "QA_information" / "Open-access" / "MiniMed Real X-Ray.json"
    answers = {
        r["question_id"]: r["gt_answer"]
        for r in json.loads(qa.read_text())
        if r["question_type"] == "Other Biological Attributes"
    }
    stem = "minimed-real-rg1uncr_f00"
    assert answers[f"{stem}-v00-otherbiologi"] == "Patient's left"
    assert answers[f"{stem}-v01-otherbiologi"] == "Patient's right"  # odd variants are mirrored


def test_two_builds_with_one_seed_are_identical(tmp_path: Path, small_build: Path) -> None:
    again = tmp_path / "again"
    curate_bundled(again, _small_cfg())
    for name in ("train.parquet", "test.parquet", "rejects.parquet"):
        assert pq.read_table(again / name).equals(pq.read_table(small_build / name)), name
    assert read_questions(again / "train.parquet").num_rows == 8
    other = tmp_path / "other"
    cfg = _small_cfg()
    cfg.bundled = SMALL.model_copy(update={"seed": 1})
    curate_bundled(other, cfg)
    assert not read_questions(other / "test.parquet").equals(
        read_questions(small_build / "test.parquet")
    )


def test_rebuild_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by build_bundled"):
        build_bundled(tmp_path, SMALL)


def test_static_backgrounds_equal_a_fresh_draw() -> None:
    for modality in ("MRI", "CT", "X-Ray", "Fundus"):
        for anatomy in STYLES[modality].anatomies:
            canvas = Canvas(40, 0.0)
            field = STYLES[modality].draw(canvas, anatomy, np.random.default_rng(123))
            rgb, cached_field = _static_background(modality, anatomy, 40)
            assert np.array_equal(canvas.rgb, rgb) and np.array_equal(field, cached_field)


@pytest.mark.parametrize("modality", MODALITIES)
def test_answers_are_drawn_in_the_image(modality: str) -> None:
    """Render each scene twice from one seed, lesions at full and at zero contrast: the difference
    holds exactly the lesions, so count, quadrant and size grade can be read off the pixels."""
    style = STYLES[modality]
    size = 96
    on = DifficultyConfig(contrast=1.0, noise=0.0, distractors=0)
    off = on.model_copy(update={"contrast": 0.0})
    diameters: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i in range(40):
        img, scene = _render(style, np.random.default_rng([5, i]), size, on)
        blank, same = _render(style, np.random.default_rng([5, i]), size, off)
        assert same == scene
        diff = np.abs(img.astype(float) - blank.astype(float))
        diff = diff.max(axis=-1) if diff.ndim == 3 else diff
        # one pixel of dilation bridges rim pixels over same-coloured anatomy; lesions are 5 px apart
        labels, n = ndimage.label(ndimage.binary_dilation(diff > 0.08))
        assert n == len(scene.lesions), (modality, i, n, scene)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            diameters[scene.grade].append(2 * np.sqrt(len(xs) / np.pi) / size)
        if scene.quadrant is not None:
            ys, xs = np.nonzero(labels)
            q = (0 if ys.mean() < size / 2 else 2) + (0 if xs.mean() < size / 2 else 1)
            assert QUADRANTS[q] == QUADRANTS[scene.quadrant]
    # the size grades are separated in pixels (ring lesions fill less area, so compare maxima/minima)
    present = [g for g in range(3) if diameters[g]]
    assert len(present) >= 2
    means = [np.median(diameters[g]) for g in present]
    assert means == sorted(means), (
        modality,
        dict(zip([GRADES[g] for g in present], means, strict=True)),
    )


@pytest.mark.slow
def test_default_bundled_build_counts_and_timing(tmp_path: Path) -> None:
    """`kepo curate bundled` defaults: 300 MRI train items, 60 test items per modality."""
    cfg = CurationConfig(train_size=BUNDLED_TRAIN_SIZE, test_per_modality=BUNDLED_TEST_PER_MODALITY)
    res = curate_bundled(tmp_path / "mm", cfg)
    assert not res.shortfalls
    assert res.per_modality["MRI"]["train_sample"] == 300
    assert all(res.per_modality[m]["test_sample"] == 60 for m in MODALITIES)
    assert res.seconds < 60


def test_difficulty_overrides_apply_per_modality(tmp_path: Path) -> None:
    hard = {"n_options": 6, "lesion_scale": 0.6, "contrast": 0.3, "distractors": 4, "noise": 0.1}
    cfg = BundledDatasetConfig(
        synthetic_per_modality=10, include_real=False, image_size=48, difficulty={"OCT": hard}
    )
    qa = build_bundled(tmp_path, cfg) / "QA_information" / "Open-access"
    assert sorted(p.stem for p in qa.glob("*.json")) == sorted(
        f"MiniMed Synthetic {m}" for m in MODALITIES
    )
    oct_records = json.loads((qa / "MiniMed Synthetic OCT.json").read_text())
    mri_records = json.loads((qa / "MiniMed Synthetic MRI.json").read_text())
    assert {r["difficulty"] for r in oct_records} == {
        "contrast=0.3,lesion_scale=0.6,distractors=4,noise=0.1,n_options=6"
    }
    # modality questions have 8 possible answers, so they show the configured option count
    n_opts = {
        modality: {
            sum(f"option_{c}" in r for c in "ABCDEF")
            for r in recs
            if r["question_type"] == "Modality Recognition"
        }
        for modality, recs in (("OCT", oct_records), ("MRI", mri_records))
    }
    assert n_opts == {"OCT": {6}, "MRI": {4}}


def _layouts_by_answer(root: Path) -> dict[tuple[str, str, str], set[tuple[str, ...]]]:
    """(QA file, question, answer) -> the option lists it was asked with, over a build."""
    layouts: dict[tuple[str, str, str], set[tuple[str, ...]]] = {}
    for path in sorted((root / "QA_information" / "Open-access").glob("*.json")):
        for r in json.loads(path.read_text()):
            options = tuple(r[f"option_{c}"] for c in "ABCDEF" if f"option_{c}" in r)
            assert r["gt_answer"] in options, r["question_id"]
            assert len(set(options)) == len(options), r["question_id"]
            layouts.setdefault((path.stem, r["question"], r["gt_answer"]), set()).add(options)
    return layouts


def _letters(layouts: set[tuple[str, ...]], answer: str) -> set[str]:
    return {"ABCDEF"[options.index(answer)] for options in layouts}


def test_fixed_option_order_makes_the_letter_a_function_of_the_answer(tmp_path: Path) -> None:
    cfg = BundledDatasetConfig(
        synthetic_per_modality=16,
        real_variants_per_image=1,
        image_size=32,
        option_order="fixed",
        difficulty={"MRI": DifficultyConfig(n_options=6)},
    )
    layouts = _layouts_by_answer(build_bundled(tmp_path, cfg))
    assert len(layouts) > 50
    # one answer text -> one letter and one option list, whatever image it is asked about
    assert all(len(_letters(v, key[2])) == 1 for key, v in layouts.items())
    assert all(len(v) == 1 for v in layouts.values())
    mri = [
        k for k in layouts if k[0].endswith(" MRI") and k[1].startswith("Which imaging modality")
    ]
    assert mri and all(len(next(iter(layouts[k]))) == 6 for k in mri)
    # and the shuffled default really does vary the letter of an answer
    shuffled = build_bundled(tmp_path / "s", cfg.model_copy(update={"option_order": "shuffled"}))
    letters = [_letters(v, key[2]) for key, v in _layouts_by_answer(shuffled).items()]
    assert sum(len(v) > 1 for v in letters) > 10
