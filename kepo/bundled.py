"""MiniMedVQA: the offline default dataset, built as a folder in the OmniMedVQA layout.

`build_bundled(out_root, cfg)` writes

    out_root/QA_information/Open-access/MiniMed Real <Modality>.json
    out_root/QA_information/Open-access/MiniMed Synthetic <Modality>.json
    out_root/Images/<Dataset>/<name>.png

with records in the release's own format (verbatim `modality_type` strings, `gt_answer` as option
text, `option_A`..), plus four extra keys the ingestion keeps: `image_source` ('real' or
'synthetic'), `rationale`, `reference_hint` and `difficulty`. `kepo.curate.curate_bundled` then
ingests it through the same code path as OmniMedVQA.

Two kinds of images:

- **Real** medical images shipped in wheels: DICOM files of pydicom / pydicom-data that decode
  with numpy alone (MRI, CT, X-ray, ultrasound) and scikit-image's fundus and microscopy images.
  Their questions are answered by the files' own metadata (DICOM Modality, BodyPartExamined,
  Study/Series descriptions, ImageOrientationPatient / PatientOrientation; scikit-image's
  docstrings); each label names its evidence in `REAL_SOURCES` and is checked against the file
  at build time. Label-preserving variants (crops, left-right flips, display windows) raise the
  counts; a flip changes the orientation answer in a known way.
- **Synthetic** images for all eight modalities, one rendering style per modality, whose answers
  are fixed by what is drawn: modality (style), anatomy (outline), finding (colour/shape of the
  round lesions, or none), size grade (lesion diameter: small ~9 %, medium ~15 %, large ~22 % of
  the image width, times `lesion_scale`), location (quadrant of a single lesion) and count
  (1-3 lesions). Thin streaks are distractors, never lesions. Every synthetic question carries a
  plain-text reference rationale and a hint.

The build is deterministic for a seed: each image draws from `numpy.random.default_rng` keyed by
(seed, modality, image index), so images do not depend on build order or on other settings.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from kepo.config import BundledDatasetConfig, DifficultyConfig, OptionOrder
from kepo.omnimedvqa import OMNIMEDVQA_MODALITY_STRINGS, QA_SUBDIR
from schemas.tables import LETTERS, MODALITIES

log = logging.getLogger(__name__)

BUNDLED_FORMAT_VERSION = 1  # bump when the builder's output changes for the same settings
MARKER = ".minimedvqa"  # marks a folder build_bundled may clear and rebuild

_RAW_MODALITY = {name: raw for raw, name in OMNIMEDVQA_MODALITY_STRINGS.items()}
MODALITY_ANSWERS: dict[str, str] = {
    "MRI": "MRI",
    "CT": "CT",
    "X-Ray": "X-ray",
    "Ultrasound": "Ultrasound",
    "Dermoscopy": "Dermoscopy",
    "Fundus": "Fundus photography",
    "OCT": "Optical coherence tomography",
    "Microscopy": "Microscopy",
}
GRADES = ("Small", "Medium", "Large")
GRADE_DIAMETER = (0.09, 0.15, 0.22)  # lesion diameter / image width, before lesion_scale
QUADRANTS = ("Upper left", "Upper right", "Lower left", "Lower right")
COUNT_WORDS = ("None", "One", "Two", "Three", "Four")
NO_FINDING = "No abnormality"

MT, AI, DD, LG, OBA = (
    "Modality Recognition",
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Other Biological Attributes",
)

Color = tuple[float, float, float]


# ------------------------------------------------------------------------------ drawing
class Canvas:
    """A size x size RGB float image with anti-aliased shapes in unit coordinates (0..1)."""

    def __init__(self, size: int, background: Color | float) -> None:
        self.size = size
        c = (np.arange(size) + 0.5) / size
        self.y, self.x = np.meshgrid(c, c, indexing="ij")  # (S, S) each
        self.rgb = np.empty((size, size, 3))  # (S, S, 3)
        self.rgb[:] = background

    def _cover(self, signed: np.ndarray) -> np.ndarray:
        """Signed distance (unit coordinates, > 0 inside) -> pixel coverage in [0, 1]."""
        return np.clip(signed * self.size + 0.5, 0.0, 1.0)

    def _window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Pixel rows/columns covering the unit box [x0, x1] x [y0, y1] (plus one pixel)."""
        n = self.size

        def span(a: float, b: float) -> slice:
            return slice(max(0, math.floor(a * n) - 1), min(n, math.ceil(b * n) + 1))

        return span(y0, y1), span(x0, x1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        # computed only inside the bounding box: shapes are small, canvases many
        reach = max(rx, ry)
        win = self._window(cx - reach, cy - reach, cx + reach, cy + reach)
        mask = np.zeros_like(self.x)
        dx, dy = self.x[win] - cx, self.y[win] - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
        q = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        mask[win] = self._cover((1.0 - q) * min(rx, ry))
        return mask

    def disc(self, cx: float, cy: float, r: float) -> np.ndarray:
        return self.ellipse(cx, cy, r, r)

    def ring(self, cx: float, cy: float, r: float, width: float) -> np.ndarray:
        return np.clip(self.disc(cx, cy, r) - self.disc(cx, cy, r - width), 0.0, 1.0)

    def segment(self, x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
        return self.polyline(np.array([(x0, y0), (x1, y1)]), width)

    def polyline(self, points: np.ndarray, width: float) -> np.ndarray:
        """Thick polyline through `points` (K, 2), all segments at once inside their box."""
        pts = np.asarray(points, dtype=float)
        lo, hi = pts.min(axis=0) - width, pts.max(axis=0) + width
        win = self._window(lo[0], lo[1], hi[0], hi[1])
        mask = np.zeros_like(self.x)
        x, y = self.x[win][None], self.y[win][None]  # (1, h, w)
        a, d = pts[:-1, :, None, None], np.diff(pts, axis=0)[:, :, None, None]  # (K-1, 2, 1, 1)
        length2 = np.maximum((d**2).sum(axis=1), 1e-12)  # (K-1, 1, 1)
        t = np.clip(((x - a[:, 0]) * d[:, 0] + (y - a[:, 1]) * d[:, 1]) / length2, 0.0, 1.0)
        dist = np.hypot(x - a[:, 0] - t * d[:, 0], y - a[:, 1] - t * d[:, 1]).min(axis=0)
        mask[win] = self._cover(width / 2 - dist)
        return mask

    def box(self, cx: float, cy: float, hw: float, hh: float, radius: float = 0.0) -> np.ndarray:
        qx = np.abs(self.x - cx) - (hw - radius)
        qy = np.abs(self.y - cy) - (hh - radius)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
        return self._cover(radius - outside)

    def paint(self, mask: np.ndarray, color: Color | float, alpha: float = 1.0) -> None:
        """Blend `color` in where `mask` covers, by `alpha` (relative to what is there)."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(mask.any(axis=0))
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # work on the bbox only
        sub = self.rgb[win]
        sub += (alpha * mask[win])[..., None] * (np.asarray(color, dtype=float) - sub)


def _gray(v: float) -> Color:
    return (v, v, v)


def _speckle(rng: np.random.Generator, size: int, sigma: float = 0.7) -> np.ndarray:
    """Multiplicative speckle with mean ~1 (Rayleigh, slightly smoothed)."""
    s = rng.rayleigh(1.0, (size, size)) / math.sqrt(math.pi / 2)
    return ndimage.gaussian_filter(s, sigma)


# ------------------------------------------------------------------------------ modalities
@dataclass(frozen=True)
class Finding:
    """A lesion kind: its answer text, how it is drawn, and what it looks like in words."""

    name: str
    color: Color
    look: str
    ring: bool = False


@dataclass(frozen=True)
class Style:
    """One modality's rendering: anatomies, findings, and the words rationales use."""

    modality: str
    gray: bool
    look: str  # what identifies the modality
    anatomies: dict[str, str]  # anatomy answer -> the visual cue
    findings: tuple[Finding, ...]
    anatomy_question: str
    anatomy_distractors: tuple[str, ...]  # wrong-answer options beyond the other anatomies
    draw: Callable[[Canvas, str, np.random.Generator], np.ndarray]  # -> lesion field (S, S) bool


def _mri(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    c.paint(np.ones_like(c.x), _gray(0.03))
    if anatomy == "Brain":
        c.paint(c.ellipse(0.5, 0.5, 0.42, 0.47), _gray(0.7))  # scalp fat
        c.paint(c.ellipse(0.5, 0.5, 0.39, 0.44), _gray(0.08))  # skull
        c.paint(c.ellipse(0.5, 0.5, 0.36, 0.41), _gray(0.5))  # grey matter
        c.paint(c.ellipse(0.5, 0.5, 0.28, 0.33), _gray(0.4))  # white matter
        for dx in (-0.05, 0.05):
            c.paint(c.ellipse(0.5 + dx, 0.5, 0.025, 0.09, 0.25 * np.sign(dx)), _gray(0.9))
        return c.ellipse(0.5, 0.5, 0.36, 0.41) > 0.5
    if anatomy == "Knee":
        c.paint(c.ellipse(0.5, 0.5, 0.36, 0.48), _gray(0.35))  # soft tissue
        c.paint(c.box(0.5, 0.24, 0.13, 0.24, 0.05), _gray(0.68))  # femur marrow
        c.paint(c.disc(0.5, 0.44, 0.15), _gray(0.68))  # condyle
        c.paint(c.box(0.5, 0.78, 0.14, 0.2, 0.04), _gray(0.68))  # tibia
        c.paint(c.box(0.5, 0.575, 0.16, 0.012), _gray(0.12))  # joint space
        return c.ellipse(0.5, 0.5, 0.36, 0.48) > 0.5
    # Spine, sagittal
    c.paint(c.box(0.5, 0.5, 0.44, 0.48, 0.08), _gray(0.3))
    for k in range(5):
        y = 0.12 + 0.19 * k
        c.paint(c.box(0.4, y, 0.11, 0.075, 0.02), _gray(0.5))  # vertebral body
        c.paint(c.box(0.4, y + 0.095, 0.1, 0.014, 0.01), _gray(0.85))  # disc (T2-bright)
    c.paint(c.box(0.62, 0.5, 0.05, 0.48), _gray(0.88))  # CSF
    c.paint(c.box(0.62, 0.5, 0.022, 0.48), _gray(0.45))  # cord
    return c.box(0.5, 0.5, 0.44, 0.48, 0.08) > 0.5


def _ct(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    c.paint(np.ones_like(c.x), _gray(0.0))
    if anatomy == "Head":
        c.paint(c.ellipse(0.5, 0.5, 0.4, 0.46), _gray(0.97))  # skull
        c.paint(c.ellipse(0.5, 0.5, 0.36, 0.42), _gray(0.45))  # brain
        for dx in (-0.05, 0.05):
            c.paint(c.ellipse(0.5 + dx, 0.5, 0.022, 0.08), _gray(0.22))  # ventricles
        return c.ellipse(0.5, 0.5, 0.36, 0.42) > 0.5
    if anatomy == "Chest":
        c.paint(c.ellipse(0.5, 0.52, 0.46, 0.36), _gray(0.5))
        for cx in (0.29, 0.71):
            c.paint(c.ellipse(cx, 0.5, 0.15, 0.23), _gray(0.1))  # lungs
        c.paint(c.ellipse(0.55, 0.55, 0.11, 0.12), _gray(0.56))  # heart
        c.paint(c.disc(0.5, 0.8, 0.055), _gray(0.97))  # vertebra
        for a in np.linspace(0.15, math.pi - 0.15, 9):
            c.paint(c.disc(0.5 + 0.44 * math.cos(a), 0.52 + 0.34 * math.sin(a), 0.014), _gray(0.95))
        return c.ellipse(0.5, 0.52, 0.44, 0.34) > 0.5
    # Abdomen
    c.paint(c.ellipse(0.5, 0.52, 0.47, 0.38), _gray(0.32))  # fat
    c.paint(c.ellipse(0.5, 0.52, 0.42, 0.33), _gray(0.5))
    c.paint(c.ellipse(0.33, 0.44, 0.2, 0.17, 0.3), _gray(0.6))  # liver
    for cx in (0.33, 0.67):
        c.paint(c.ellipse(cx, 0.7, 0.06, 0.09), _gray(0.66))  # kidneys
    c.paint(c.disc(0.5, 0.76, 0.06), _gray(0.97))  # vertebra
    c.paint(c.disc(0.54, 0.63, 0.028), _gray(0.7))  # aorta
    return c.ellipse(0.5, 0.52, 0.44, 0.35) > 0.5


def _xray(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    c.paint(np.ones_like(c.x), _gray(0.06))
    if anatomy == "Chest":
        c.paint(c.box(0.5, 0.56, 0.44, 0.44, 0.12), _gray(0.4))
        for cx in (0.3, 0.7):
            c.paint(c.ellipse(cx, 0.5, 0.16, 0.3), _gray(0.14))  # lungs
        c.paint(c.ellipse(0.55, 0.64, 0.14, 0.17), _gray(0.55))  # heart shadow
        for side in (-1, 1):
            for k in range(7):
                xs = np.linspace(0.5 + side * 0.05, 0.5 + side * 0.44, 12)
                ys = 0.22 + 0.075 * k + 0.5 * (xs - 0.5 - side * 0.2) ** 2
                c.paint(c.polyline(np.stack([xs, ys], 1), 0.012), _gray(0.62), 0.6)  # ribs
        return c.box(0.5, 0.56, 0.42, 0.42, 0.1) > 0.5
    if anatomy == "Hand":
        c.paint(c.box(0.5, 0.78, 0.3, 0.2, 0.08), _gray(0.32))  # palm
        for fx, top in ((0.2, 0.45), (0.37, 0.12), (0.5, 0.08), (0.63, 0.12), (0.76, 0.2)):
            c.paint(c.box(fx, (top + 0.7) / 2, 0.05, (0.7 - top) / 2, 0.04), _gray(0.32))
            for j, y in enumerate(np.linspace(top + 0.06, 0.66, 3)):
                c.paint(c.box(fx, y, 0.025, 0.07 - 0.01 * j, 0.015), _gray(0.78))  # phalanges
        return c.box(0.5, 0.55, 0.42, 0.42, 0.06) > 0.5
    # Pelvis
    c.paint(c.box(0.5, 0.55, 0.46, 0.42, 0.1), _gray(0.32))
    c.paint(c.ring(0.5, 0.45, 0.34, 0.06), _gray(0.75))  # pelvic ring
    c.paint(c.ellipse(0.5, 0.3, 0.08, 0.12), _gray(0.7))  # sacrum
    for side in (-1, 1):
        c.paint(c.ellipse(0.5 + side * 0.14, 0.66, 0.06, 0.07), _gray(0.12))  # obturator foramina
        c.paint(c.disc(0.5 + side * 0.3, 0.8, 0.08), _gray(0.8))  # femoral heads
    return c.box(0.5, 0.55, 0.44, 0.4, 0.1) > 0.5


def _fan(c: Canvas) -> np.ndarray:
    ang = np.arctan2(c.x - 0.5, c.y - 0.02)
    rad = np.hypot(c.x - 0.5, c.y - 0.02)
    return (np.abs(ang) < math.radians(46)) & (rad > 0.06) & (rad < 0.97)


def _ultrasound(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    fan = _fan(c)
    c.paint(np.ones_like(c.x), _gray(0.36))
    if anatomy == "Liver":
        for _ in range(4):
            x, y = rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.85)
            c.paint(c.ellipse(x, y, 0.025, 0.018), _gray(0.04))  # vessels
    elif anatomy == "Kidney":
        c.paint(np.ones_like(c.x), _gray(0.28))
        c.paint(c.ellipse(0.5, 0.56, 0.3, 0.17, -0.15), _gray(0.42))  # cortex
        c.paint(c.ellipse(0.5, 0.56, 0.15, 0.05, -0.15), _gray(0.85))  # sinus
    else:  # Urinary bladder
        c.paint(c.box(0.5, 0.84, 0.22, 0.1, 0.04), _gray(0.62))  # posterior enhancement
        c.paint(c.ellipse(0.5, 0.56, 0.26, 0.2), _gray(0.03))
    c.rgb *= _speckle(rng, c.size)[..., None]
    c.rgb[~fan] = 0.0
    return fan


def _dermoscopy(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    skin = np.array([0.87, 0.68, 0.58])
    c.rgb[:] = (
        skin * (1 + 0.04 * ndimage.gaussian_filter(rng.normal(size=(c.size, c.size)), 4))[..., None]
    )
    if anatomy == "Trunk skin":
        grid = (np.sin(c.x * 60 + 0.3 * np.sin(c.y * 20)) * np.sin(c.y * 60)) > 0.6
        c.paint(grid.astype(float), (0.78, 0.58, 0.48), 0.5)
    elif anatomy == "Acral skin (palm or sole)":
        ridges = np.sin((c.x + 0.6 * c.y) * 70) > 0.4
        c.paint(ridges.astype(float), (0.72, 0.52, 0.44), 0.8)
    else:  # Scalp
        for _ in range(18):
            x0, y0 = rng.uniform(0, 1, 2)
            a = rng.uniform(0, math.pi)
            pts = np.array(
                [
                    (x0 + t * math.cos(a) + 0.03 * math.sin(9 * t), y0 + t * math.sin(a))
                    for t in np.linspace(0, 0.45, 8)
                ]
            )
            c.paint(c.polyline(pts, 0.011), (0.18, 0.12, 0.09))
    field = c.disc(0.5, 0.5, 0.48) > 0.5
    c.paint(1.0 - c.disc(0.5, 0.5, 0.48), _gray(0.02))  # round field of view
    return field


def _fundus(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    # the optic disc lies nasally: on the image's left for a left eye
    side = -1 if anatomy == "Left eye" else 1
    c.paint(np.ones_like(c.x), _gray(0.0))
    r = np.hypot(c.x - 0.5, c.y - 0.5)
    retina = c.disc(0.5, 0.5, 0.46)
    c.paint(retina, (0.82, 0.36, 0.14))
    c.rgb *= (1 - 0.5 * np.clip(r / 0.46, 0, 1) ** 3)[..., None]  # vignetting
    dx, dy = 0.5 + side * 0.24, 0.5
    c.paint(c.disc(0.5 - side * 0.08, 0.52, 0.07), (0.55, 0.2, 0.08), 0.6)  # macula
    for up in (-1, 1):
        for spread in (0.16, 0.27):
            t = np.linspace(0, 1, 10)
            xs = dx - side * t * 0.55
            ys = dy + up * spread * np.sin(t * math.pi * 0.85)
            c.paint(c.polyline(np.stack([xs, ys], 1), 0.014) * retina, (0.5, 0.08, 0.05))  # vessels
    c.paint(c.disc(dx, dy, 0.085), (0.98, 0.82, 0.62))  # optic disc, with a paler cup
    c.paint(c.disc(dx + side * 0.015, dy, 0.04), (1.0, 0.96, 0.9))
    # lesions stay off the disc, so no round spot there is ever a finding
    return (c.disc(0.5, 0.5, 0.44) > 0.5) & (c.disc(dx, dy, 0.1) < 0.5)


def _oct(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    c.paint(np.ones_like(c.x), _gray(0.05))
    bump = np.exp(-(((c.x - 0.5) / 0.09) ** 2))  # (S, S)
    tilt = 0.04 * (c.x - 0.5) if anatomy == "Peripheral retina" else 0.0
    top = 0.19 + tilt + (0.1 * bump if anatomy == "Macula" else 0.0)
    scale = 1.3 if anatomy == "Peripheral retina" else 1.55
    inner = 1.0 - (0.75 * bump if anatomy == "Macula" else 0.0)
    layers = (  # (thickness, intensity): NFL, GCL/IPL, INL, OPL, ONL, EZ, RPE, choroid
        (0.03 * inner, 0.78),
        (0.06 * inner, 0.48),
        (0.04 * inner, 0.24),
        (0.025, 0.52),
        (0.08, 0.2),
        (0.015, 0.8),
        (0.03, 0.92),
        (0.12, 0.48),
    )
    y = np.asarray(top) * np.ones_like(c.x)
    for thick, level in layers:
        band = (c.y >= y) & (c.y < y + thick * scale)
        c.rgb[band] = level
        y = y + thick * scale
    if anatomy == "Optic nerve head":
        cup = np.exp(-(((c.x - 0.5) / 0.07) ** 2))
        c.rgb[(c.y > 0.17) & (c.y < 0.17 + 0.5 * cup)] = 0.06  # cup: layers end at the nerve
    c.rgb *= _speckle(rng, c.size, 0.6)[..., None]
    return (c.y > 0.17) & (c.y < 0.83)


def _microscopy(c: Canvas, anatomy: str, rng: np.random.Generator) -> np.ndarray:
    if anatomy == "Blood smear":
        c.rgb[:] = (0.96, 0.9, 0.9)
        for _ in range(34):
            x, y = rng.uniform(0.03, 0.97, 2)
            c.paint(c.disc(x, y, 0.036), (0.86, 0.48, 0.52))
            c.paint(c.disc(x, y, 0.014), (0.93, 0.72, 0.74))  # pale centre
    elif anatomy == "Glandular epithelium":
        c.rgb[:] = (0.93, 0.7, 0.8)
        for gx, gy in ((0.28, 0.3), (0.72, 0.32), (0.3, 0.74), (0.72, 0.74)):
            c.paint(c.ellipse(gx, gy, 0.13, 0.11), (0.98, 0.95, 0.96))  # lumen
            for a in np.linspace(0, 2 * math.pi, 14, endpoint=False):
                c.paint(
                    c.disc(gx + 0.15 * math.cos(a), gy + 0.13 * math.sin(a), 0.016),
                    (0.38, 0.2, 0.55),
                )
    else:  # Connective tissue
        c.rgb[:] = (0.94, 0.72, 0.8)
        for k in range(9):
            xs = np.linspace(0, 1, 12)
            ys = 0.05 + 0.11 * k + 0.025 * np.sin(xs * 12 + k)
            c.paint(c.polyline(np.stack([xs, ys], 1), 0.01), (0.85, 0.5, 0.65), 0.7)  # fibres
        for _ in range(18):
            x, y = rng.uniform(0.05, 0.95, 2)
            c.paint(
                c.ellipse(x, y, 0.04, 0.01, rng.uniform(-0.4, 0.4)), (0.4, 0.22, 0.58)
            )  # spindle nuclei
    return np.ones_like(c.x, dtype=bool)


_W, _K = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
STYLES: dict[str, Style] = {
    s.modality: s
    for s in (
        Style(
            "MRI",
            True,
            "a grey-scale slice with rich soft-tissue contrast, dark cortical bone and bright fluid, as in MRI",
            {
                "Brain": "an oval head outline with grey and white matter around bright fluid-filled ventricles",
                "Knee": "two long bones with bright marrow meeting at a joint, the femur above and the tibia below",
                "Spine": "a vertical stack of vertebral bodies separated by bright discs, with the spinal canal beside them",
            },
            (
                Finding("Hyperintense lesion", _W, "bright round spot"),
                Finding("Hypointense lesion", _K, "dark round spot"),
                Finding("Ring-enhancing lesion", _W, "ring with a bright rim", ring=True),
            ),
            "Which body region does this MRI show?",
            ("Liver", "Shoulder", "Pelvis"),
            _mri,
        ),
        Style(
            "CT",
            True,
            "a grey-scale cross-section of the body in which bone is white and air is black, as in CT",
            {
                "Head": "a bright oval skull ring around uniform brain tissue",
                "Chest": "two large black air-filled lungs on either side of the heart, with ribs and the spine around them",
                "Abdomen": "a large solid liver on one side, two kidneys and the spine at the back, and no air-filled lungs",
            },
            (
                Finding("Hyperdense lesion", _W, "bright round spot"),
                Finding("Hypodense lesion", _K, "dark round spot"),
                Finding("Rim-enhancing lesion", _W, "ring with a bright rim", ring=True),
            ),
            "Which body region does this CT scan show?",
            ("Pelvis", "Neck", "Knee"),
            _ct,
        ),
        Style(
            "X-Ray",
            True,
            "a projection image in which dense bone is white and air-filled regions are dark, as in a radiograph",
            {
                "Chest": "dark lung fields crossed by curved ribs, with the heart shadow in the middle",
                "Hand": "five fingers made of short bone segments above the palm",
                "Pelvis": "a wide bony ring with two round femoral heads below it",
            },
            (
                Finding("Round opacity", _W, "bright round spot"),
                Finding("Lucent lesion", _K, "dark round spot"),
                Finding("Ring shadow", _W, "ring with a bright rim", ring=True),
            ),
            "Which body part does this radiograph show?",
            ("Skull", "Foot", "Knee"),
            _xray,
        ),
        Style(
            "Ultrasound",
            True,
            "a fan-shaped sector of grainy speckle on a black background, as in ultrasound",
            {
                "Liver": "a large evenly speckled organ filling the sector, crossed by small dark vessels",
                "Kidney": "a bean-shaped organ with a bright central sinus",
                "Urinary bladder": "a large black fluid-filled sac with bright enhancement behind it",
            },
            (
                Finding("Hyperechoic lesion", _W, "bright round spot"),
                Finding("Anechoic cyst", _K, "black round spot"),
                Finding("Target lesion", _W, "ring with a bright rim", ring=True),
            ),
            "Which organ does this ultrasound scan show?",
            ("Thyroid", "Gallbladder", "Heart"),
            _ultrasound,
        ),
        Style(
            "Dermoscopy",
            False,
            "a magnified colour view of the skin surface inside a round field with dark corners, as in dermoscopy",
            {
                "Trunk skin": "smooth skin with a faint fine network and no hairs or ridges",
                "Acral skin (palm or sole)": "parallel ridges and furrows, as on a palm or sole",
                "Scalp": "many dark hair shafts crossing the skin",
            },
            (
                Finding("Pigmented lesion", (0.28, 0.16, 0.1), "dark brown round patch"),
                Finding("Hypopigmented patch", (0.99, 0.96, 0.93), "whitish round patch"),
                Finding("Vascular lesion", (0.78, 0.06, 0.16), "red ring", ring=True),
            ),
            "Which skin site does this dermoscopy image show?",
            (),
            _dermoscopy,
        ),
        Style(
            "Fundus",
            False,
            "an orange-red circular retina on a black background with vessels leaving a pale optic disc, as in fundus photography",
            {
                "Left eye": "the optic disc lies on the left of the image, which is where a left eye's disc appears",
                "Right eye": "the optic disc lies on the right of the image, which is where a right eye's disc appears",
            },
            (
                Finding("Hard exudates", (1.0, 0.93, 0.35), "bright yellow round spot"),
                Finding("Retinal hemorrhage", (0.3, 0.01, 0.01), "dark red round spot"),
                Finding("Cotton-wool spot", (0.96, 0.95, 0.93), "whitish ring", ring=True),
            ),
            "Which eye does this fundus photograph show?",
            (),
            _fundus,
        ),
        Style(
            "OCT",
            True,
            "a grey-scale cross-section made of horizontal bright and dark layers with grainy speckle, as in optical coherence tomography",
            {
                "Macula": "the retinal layers dip into a central foveal pit",
                "Optic nerve head": "the layers stop at a deep central cup where the nerve leaves the eye",
                "Peripheral retina": "flat, evenly thin layers with no pit or cup",
            },
            (
                Finding("Hyperreflective foci", _W, "bright round spot"),
                Finding("Intraretinal fluid", _K, "dark round spot"),
                Finding("Pigment epithelial detachment", _W, "ring with a bright rim", ring=True),
            ),
            "Which part of the retina does this OCT scan cross?",
            (),
            _oct,
        ),
        Style(
            "Microscopy",
            False,
            "a magnified colour view of stained cells and tissue in pink and purple, as in light microscopy",
            {
                "Blood smear": "many separate round red cells with pale centres",
                "Glandular epithelium": "rings of purple nuclei around pale lumens",
                "Connective tissue": "wavy pink fibres with scattered elongated nuclei",
            },
            (
                Finding("Atypical large cell", (0.22, 0.04, 0.32), "large dark purple round cell"),
                Finding("Vacuolated cell", (1.0, 1.0, 1.0), "clear white round space"),
                Finding("Ring-form parasite", (0.32, 0.08, 0.5), "thin purple ring", ring=True),
            ),
            "Which kind of tissue or preparation is shown?",
            (),
            _microscopy,
        ),
    )
}
assert tuple(STYLES) == MODALITIES


# ------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Question:
    """One multiple-choice question about an image, in the release's terms."""

    qtype: str
    question: str
    options: tuple[str, ...]
    answer: str
    rationale: str | None
    hint: str | None


def _options(
    rng: np.random.Generator,
    answer: str,
    pool: tuple[str, ...],
    n: int,
    order: OptionOrder = "shuffled",
) -> tuple[str, ...]:
    """`answer` plus up to n-1 distinct distractors from `pool`.

    order "shuffled": random distractors in a random order (as in OmniMedVQA).
    order "fixed": the block of n consecutive `pool` entries that holds the answer (the last n
    when its block is short), in `pool` order: every question of a type lists the same options
    in the same order, so an option's letter is a function of its text.
    """
    if order == "fixed":
        ordered = list(dict.fromkeys((*pool, answer) if answer not in pool else pool))
        if len(ordered) <= n:
            return tuple(ordered)
        start = min(ordered.index(answer) // n * n, len(ordered) - n)
        return tuple(ordered[start : start + n])
    others = [p for p in pool if p != answer]
    k = min(n - 1, len(others))
    picked = [others[i] for i in sorted(rng.choice(len(others), size=k, replace=False).tolist())]
    opts = [answer, *picked]
    return tuple(opts[i] for i in rng.permutation(len(opts)))


def _modality_question(
    rng: np.random.Generator, modality: str, look: str, n: int, order: OptionOrder
) -> Question:
    answer = MODALITY_ANSWERS[modality]
    return Question(
        MT,
        "Which imaging modality was used to acquire this image?",
        _options(rng, answer, tuple(MODALITY_ANSWERS.values()), n, order),
        answer,
        f"The image shows {look}. The modality is {answer}.",
        "Look at the overall texture, colours and shape of the picture.",
    )


@dataclass(frozen=True)
class Scene:
    """The latent content of a synthetic image: what the questions ask about."""

    anatomy: str
    finding: int | None  # index into the style's findings; None = no lesion
    grade: int
    lesions: tuple[tuple[float, float, float], ...]  # (cx, cy, r) in unit coordinates
    quadrant: int | None  # for a single lesion


def _place(
    rng: np.random.Generator,
    field: np.ndarray,
    visible: np.ndarray,
    count: int,
    r_mean: float,
    quadrant: int | None,
) -> list[tuple[float, float, float]] | None:
    """Lesion discs (cx, cy, r) inside `field`, at least 90 % over pixels where the finding's
    colour stands out (`visible`), in `quadrant` when given, 5 px apart; None when they do not fit."""
    size = field.shape[0]
    px = 1.0 / size
    grid = (np.arange(size) + 0.5) / size
    lesions: list[tuple[float, float, float]] = []
    for _ in range(300):
        if len(lesions) == count:
            return lesions
        r = r_mean * rng.uniform(0.95, 1.05)
        if quadrant is not None:
            sx, sy = (-1 if quadrant in (0, 2) else 1), (-1 if quadrant in (0, 1) else 1)
            lo, hi = r + 3 * px, 0.5 - r - px
            if hi <= lo:
                return None
            cx, cy = 0.5 + sx * rng.uniform(lo, hi), 0.5 + sy * rng.uniform(lo, hi)
        else:
            cx, cy = rng.uniform(r + px, 1 - r - px, 2)
        if any(math.hypot(cx - x, cy - y) < r + q + 5 * px for x, y, q in lesions):
            continue
        rows = slice(max(0, int((cy - r) * size)), min(size, int((cy + r) * size) + 2))
        cols = slice(max(0, int((cx - r) * size)), min(size, int((cx + r) * size) + 2))
        inside = (grid[cols][None, :] - cx) ** 2 + (grid[rows][:, None] - cy) ** 2 <= r * r
        if not inside.any() or not field[rows, cols][inside].all():
            continue
        if visible[rows, cols][inside].mean() < 0.9:
            continue
        lesions.append((float(cx), float(cy), float(r)))
    return lesions if len(lesions) == count else None


_STATIC_BACKGROUNDS = {"MRI", "CT", "X-Ray", "Fundus"}  # their anatomy drawing uses no randomness


@functools.lru_cache(maxsize=32)
def _static_background(modality: str, anatomy: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, lesion field) of an anatomy drawn without randomness, drawn once per build."""
    canvas = Canvas(size, 0.0)
    field = STYLES[modality].draw(canvas, anatomy, np.random.default_rng(0))
    return canvas.rgb, field


def _render(
    style: Style, rng: np.random.Generator, size: int, diff: DifficultyConfig
) -> tuple[np.ndarray, Scene]:
    """Draw one synthetic image; resample the scene until its lesions fit the field."""
    for _ in range(50):
        anatomy = list(style.anatomies)[int(rng.integers(len(style.anatomies)))]
        count = int(rng.choice(4, p=[0.15, 0.45, 0.25, 0.15]))
        finding = int(rng.integers(len(style.findings))) if count else None
        grade = int(rng.integers(3))
        quadrant = int(rng.integers(4)) if count == 1 else None
        canvas = Canvas(size, 0.0)
        if style.modality in _STATIC_BACKGROUNDS:
            background, field = _static_background(style.modality, anatomy, size)
            canvas.rgb = background.copy()
        else:
            field = style.draw(canvas, anatomy, rng)
        r = GRADE_DIAMETER[grade] * diff.lesion_scale / 2
        lesions: list[tuple[float, float, float]] | None = []
        if finding is not None:
            target = np.asarray(style.findings[finding].color)
            visible = np.abs(canvas.rgb - target).max(axis=-1) >= 0.25  # (S, S)
            lesions = _place(rng, field, visible, count, r, quadrant)
        if lesions is None:
            continue
        px = 1.0 / size
        for _ in range(diff.distractors):  # thin streaks: lesion-coloured but not round
            f = style.findings[int(rng.integers(len(style.findings)))]
            x0, y0 = rng.uniform(0.1, 0.9, 2)
            a, length = rng.uniform(0, math.pi), rng.uniform(0.12, 0.25)
            x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
            mid = ((x0 + x1) / 2, (y0 + y1) / 2)
            if any(
                math.hypot(px_ - cx, py_ - cy) < q + 3 * px
                for cx, cy, q in lesions
                for px_, py_ in ((x0, y0), (x1, y1), mid)
            ):
                continue
            canvas.paint(canvas.segment(x0, y0, x1, y1, 1.3 * px), f.color, 0.8 * diff.contrast)
        if finding is not None:
            f = style.findings[finding]
            for cx, cy, q in lesions:
                mask = (
                    canvas.ring(cx, cy, q, max(0.35 * q, 1.5 * px))
                    if f.ring
                    else canvas.disc(cx, cy, q)
                )
                canvas.paint(mask, f.color, diff.contrast)
        img = canvas.rgb
        if style.gray:
            img = img.mean(axis=2, keepdims=True)
        img = img + rng.normal(0.0, diff.noise, img.shape[:2])[..., None]
        img = np.clip(img, 0.0, 1.0)
        scene = Scene(anatomy, finding, grade, tuple(lesions), quadrant)
        return (img[..., 0] if style.gray else img), scene
    raise ValueError(
        f"{style.modality}: could not fit the lesions in 50 tries; lower "
        f"bundled.difficulty.{style.modality}.lesion_scale (now {diff.lesion_scale:g})"
    )


def _synthetic_questions(
    rng: np.random.Generator,
    style: Style,
    scene: Scene,
    cfg: BundledDatasetConfig,
    diff: DifficultyConfig,
) -> list[Question]:
    n, order = diff.n_options, cfg.option_order
    count = len(scene.lesions)
    f = style.findings[scene.finding] if scene.finding is not None else None
    plural = "lesions" if count > 1 else "lesion"
    out: dict[str, Question] = {MT: _modality_question(rng, style.modality, style.look, n, order)}
    anatomy_pool = (*style.anatomies, *style.anatomy_distractors)
    out[AI] = Question(
        AI,
        style.anatomy_question,
        _options(rng, scene.anatomy, anatomy_pool, n, order),
        scene.anatomy,
        f"The image shows {style.anatomies[scene.anatomy]}, so it is the {scene.anatomy.lower()}."
        if style.modality != "Fundus"
        else f"In this fundus photograph {style.anatomies[scene.anatomy]}, so it is the {scene.anatomy.lower()}.",
        "Find the optic disc: it sits on the same side as the eye."
        if style.modality == "Fundus"
        else "Look at the outline and inner structure of the main organ.",
    )
    diagnosis = f.name if f else NO_FINDING
    if f:
        seen = f"There {'is one' if count == 1 else f'are {COUNT_WORDS[count].lower()}'} {f.look}{'s' if count > 1 else ''}"
        why = f"{seen} apart from the normal anatomy, which is how {f.name.lower()} looks here."
    else:
        why = "No round spot stands out from the surrounding tissue (thin streaks are not lesions), so there is no abnormality."
    out[DD] = Question(
        DD,
        "Which abnormality is visible in this image?",
        _options(rng, diagnosis, (*(x.name for x in style.findings), NO_FINDING), n, order),
        diagnosis,
        why,
        "Compare the colour and shape of any round spot with the surrounding tissue; thin streaks do not count.",
    )
    if f:
        width = 2 * float(np.mean([q for _, _, q in scene.lesions]))
        sizes = ", ".join(
            f"{g.lower()} about {100 * d * diff.lesion_scale:.0f} %"
            for g, d in zip(GRADES, GRADE_DIAMETER, strict=True)
        )
        out[LG] = Question(
            LG,
            f"How large {'is the lesion' if count == 1 else 'are the lesions'}?",
            _options(rng, GRADES[scene.grade], GRADES, n, order),
            GRADES[scene.grade],
            f"The {plural} measure{'s' if count == 1 else ''} about {width * cfg.image_size:.0f} pixels across, "
            f"{100 * width:.0f} % of the image width; the grades are {sizes}, so {'it is' if count == 1 else 'they are'} "
            f"{GRADES[scene.grade].lower()}.",
            "Compare the lesion's diameter with the width of the image.",
        )
    if count == 1 and scene.quadrant is not None:
        cx, cy, _ = scene.lesions[0]
        where = QUADRANTS[scene.quadrant]
        out[OBA] = Question(
            OBA,
            "Where is the lesion located in the image?",
            _options(rng, where, QUADRANTS, n, order),
            where,
            f"The only {f.look if f else 'lesion'} is centred {100 * cx:.0f} % from the left and {100 * cy:.0f} % "
            f"from the top, {'left' if cx < 0.5 else 'right'} of and {'above' if cy < 0.5 else 'below'} the centre: "
            f"the {where.lower()} part of the image.",
            "Find the round lesion and compare its position with the image centre.",
        )
    else:
        out[OBA] = Question(
            OBA,
            "How many lesions are visible in the image?",
            _options(rng, COUNT_WORDS[count], COUNT_WORDS, n, order),
            COUNT_WORDS[count],
            f"Apart from the normal anatomy the image holds {COUNT_WORDS[count].lower()} {f.look}s; thin streaks are not lesions."
            if f
            else "No round spot stands out from the tissue and thin streaks are not lesions, so there are none.",
            "Count only the round lesions, not the thin streaks.",
        )
    types = [t for t in (MT, AI, DD, LG, OBA) if t in out]
    k = min(cfg.questions_per_image, len(types))
    chosen = sorted(rng.choice(len(types), size=k, replace=False).tolist())
    return [out[types[i]] for i in chosen]


# ------------------------------------------------------------------------------ real images
@dataclass(frozen=True)
class RealSource:
    """A wheel-shipped medical image and the metadata its questions are answered from.

    `evidence` pairs each label with (where, substring): a DICOM keyword of the file, or "doc"
    for the scikit-image loader's docstring. A label whose evidence is not found in the file at
    build time is dropped (with a warning), so every answer traces back to the file itself.
    """

    modality: str
    package: str  # "pydicom" (get_testdata_file name) or "skimage" (skimage.data function)
    name: str
    anatomy: str | None = None
    diagnosis: str | None = None
    diagnosis_pool: tuple[str, ...] = ()
    eye: str | None = None  # "Left eye" / "Right eye" as acquired (a flip swaps it)
    evidence: tuple[tuple[str, str, str], ...] = ()  # (label kind, where, substring)
    frames: tuple[int, ...] = (0,)


BODY_PARTS = (
    "Head",
    "Chest",
    "Abdomen",
    "Shoulder",
    "Knee",
    "Pelvis",
    "Lower leg",
    "Hand",
    "Heart",
    "Lymph node",
    "Colon",
    "Neck",
)
FUNDUS_DIAGNOSES = (
    "No abnormality",
    "Diabetic retinopathy",
    "Glaucoma",
    "Retinal detachment",
    "Age-related macular degeneration",
)
BONE_DIAGNOSES = (
    "Non-ossifying fibroma",
    "Fracture",
    "Osteosarcoma",
    "Osteomyelitis",
    "No abnormality",
)
DIRECTIONS = {
    "L": "Patient's left",
    "R": "Patient's right",
    "A": "Anterior",
    "P": "Posterior",
    "H": "Superior",
    "F": "Inferior",
}

REAL_SOURCES: tuple[RealSource, ...] = (
    RealSource("MRI", "pydicom", "MR_small.dcm"),
    RealSource(
        "MRI",
        "pydicom",
        "emri_small.dcm",
        anatomy="Head",
        evidence=(("anatomy", "BodyPartExamined", "HEAD"),),
        frames=tuple(range(10)),
    ),
    RealSource(
        "MRI",
        "pydicom",
        "MR2_UNCR.dcm",
        anatomy="Shoulder",
        evidence=(("anatomy", "StudyDescription", "SHOULDER"),),
    ),
    RealSource(
        "MRI",
        "pydicom",
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        anatomy="Abdomen",
        evidence=(("anatomy", "BodyPartExamined", "ABDOMEN"),),
    ),
    RealSource("CT", "pydicom", "CT_small.dcm"),
    RealSource("CT", "pydicom", "693_UNCR.dcm"),
    RealSource(
        "CT",
        "pydicom",
        "eCT_Supplemental.dcm",
        anatomy="Head",
        evidence=(("anatomy", "ImageType", "RCBF"),),
        frames=(0, 1),
    ),  # regional cerebral blood flow
    RealSource(
        "X-Ray",
        "pydicom",
        "RG1_UNCR.dcm",
        anatomy="Chest",
        evidence=(("anatomy", "BodyPartExamined", "CHEST"),),
    ),
    RealSource(
        "X-Ray",
        "pydicom",
        "RG3_UNCR.dcm",
        anatomy="Lower leg",
        diagnosis="Non-ossifying fibroma",
        diagnosis_pool=BONE_DIAGNOSES,
        evidence=(
            ("anatomy", "StudyDescription", "tibia"),
            ("diagnosis", "StudyDescription", "Non-ossifying fibroma"),
        ),
    ),
    RealSource("Ultrasound", "pydicom", "US1_UNCR.dcm"),
    RealSource(
        "Ultrasound",
        "pydicom",
        "color-pl.dcm",
        anatomy="Heart",
        evidence=(("anatomy", "StudyDescription", "Echocardiogram"),),
    ),
    RealSource(
        "Fundus",
        "skimage",
        "retina",
        eye="Left eye",
        diagnosis="No abnormality",
        diagnosis_pool=FUNDUS_DIAGNOSES,
        evidence=(("eye", "doc", "left_eye"), ("diagnosis", "doc", "normal_left_eye")),
    ),
    RealSource(
        "Fundus",
        "skimage",
        "microaneurysms",
        diagnosis="Diabetic retinopathy",
        diagnosis_pool=FUNDUS_DIAGNOSES,
        evidence=(("diagnosis", "doc", "07_dr"),),
    ),
    RealSource("Microscopy", "skimage", "cell"),
    RealSource(
        "Microscopy",
        "skimage",
        "immunohistochemistry",
        anatomy="Colon",
        evidence=(("anatomy", "doc", "colonic glands"),),
    ),
)
REAL_LOOKS = {  # what identifies the modality in the real images, for rationales
    "MRI": "a grey-scale slice with the soft-tissue contrast of MRI",
    "CT": "a grey-scale cross-sectional slice reconstructed by CT",
    "X-Ray": "a projection radiograph in which bone is white",
    "Ultrasound": "an ultrasound frame with speckled tissue and on-screen scanner annotations",
    "Fundus": "a photograph of the retina through the pupil",
    "Microscopy": "a magnified view of cells or tissue",
}
_SKIMAGE_FILES = {
    "retina": "retina.jpg",
    "microaneurysms": "microaneurysms.png",
    "cell": "cell.png",
    "immunohistochemistry": "ihc.png",
}


@dataclass
class _RealBase:
    """One frame of a real source, ready for variants: values plus display settings."""

    source: RealSource
    frame: int
    pixels: np.ndarray  # (H, W) modality values or (H, W, 3) RGB in [0, 1]
    window: tuple[float, float] | None  # (center, width) for grey images
    invert: bool
    right_edge: str | None  # patient direction toward the image's right edge, from the header
    labels: dict[str, str]  # verified labels: anatomy / diagnosis / eye


def _header_value(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return (
        "\\".join(map(str, value))
        if isinstance(value, list | tuple) or getattr(value, "VM", 1) > 1
        else str(value)
    )


def _right_edge(ds: Any) -> str | None:
    """Which patient direction the image's +column axis points to, from the DICOM header."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None and "SharedFunctionalGroupsSequence" in ds:
        try:
            iop = (
                ds.SharedFunctionalGroupsSequence[0]
                .PlaneOrientationSequence[0]
                .ImageOrientationPatient
            )
        except (AttributeError, IndexError):
            iop = None
    if iop is not None:
        row = [float(v) for v in list(iop)[:3]]  # direction of increasing column (LPS)
        axis = int(np.argmax(np.abs(row)))
        letters = (("R", "L"), ("A", "P"), ("F", "H"))[axis]  # LPS: +x left, +y posterior, +z head
        return DIRECTIONS[letters[1] if row[axis] > 0 else letters[0]]
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) >= 1 and str(orientation[0])[:1] in DIRECTIONS:
        return DIRECTIONS[str(orientation[0])[:1]]
    return None


def _shrink(arr: np.ndarray, longest: int = 512) -> np.ndarray:
    """Downscale a large frame once (float32 per channel) so variants stay cheap."""
    h, w = arr.shape[:2]
    if max(h, w) <= longest:
        return arr.astype(np.float64)
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    chans = [arr] if arr.ndim == 2 else [arr[..., i] for i in range(arr.shape[2])]
    out = [
        np.asarray(
            Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
        )
        for c in chans
    ]
    return (out[0] if arr.ndim == 2 else np.stack(out, axis=-1)).astype(np.float64)


def _load_real(source: RealSource) -> list[_RealBase]:
    """The frames of one real source with verified labels; [] (and a warning) when unavailable."""
    labels = {
        k: v
        for k, v in (
            ("anatomy", source.anatomy),
            ("diagnosis", source.diagnosis),
            ("eye", source.eye),
        )
        if v
    }
    if source.package == "pydicom":
        import pydicom
        from pydicom.data import get_testdata_file
        from pydicom.multival import MultiValue
        from pydicom.pixels import apply_color_lut, apply_modality_lut

        path = get_testdata_file(source.name, download=False)
        if path is None:
            log.warning("real image %s is not installed (pydicom-data); skipped", source.name)
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # test files carry deliberate header oddities
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
        text = {kw: _header_value(ds, kw) for _, kw, _ in source.evidence}
        photometric = str(ds.get("PhotometricInterpretation", ""))
        window = None
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        elif photometric.startswith("MONOCHROME"):
            arr = apply_modality_lut(arr, ds).astype(np.float64)
            center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
            if center is None and "SharedFunctionalGroupsSequence" in ds:  # enhanced multi-frame
                voi = ds.SharedFunctionalGroupsSequence[0].get("FrameVOILUTSequence")
                if voi:
                    center, width = voi[0].get("WindowCenter"), voi[0].get("WindowWidth")
            if center is not None and width is not None:
                center = center[0] if isinstance(center, MultiValue) else center
                width = width[0] if isinstance(width, MultiValue) else width
                window = (float(center), float(width))
        else:  # RGB / YBR already converted by pydicom
            arr = arr / 255.0
        frames = (
            [arr[i] for i in source.frames] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else [arr]
        )
        invert = photometric == "MONOCHROME1"
        right_edge = _right_edge(ds)
    else:
        import skimage.data

        text = {"doc": getattr(skimage.data, source.name).__doc__ or ""}
        with Image.open(Path(skimage.data.__file__).parent / _SKIMAGE_FILES[source.name]) as im:
            arr = (
                np.asarray(
                    im.convert("RGB" if im.mode not in ("L", "I;16") else "L"), dtype=np.float64
                )
                / 255.0
            )
        frames, window, invert, right_edge = [arr], None, False, None
    for kind, where, needle in source.evidence:
        if needle.casefold() not in text.get(where, "").casefold():
            log.warning(
                "%s: %s evidence %r not found in %s; label dropped",
                source.name,
                kind,
                needle,
                where,
            )
            labels.pop(kind, None)
    bases = []
    for frame_index, frame in zip(source.frames, frames, strict=False):
        if window is None and frame.ndim == 2:
            lo, hi = np.percentile(frame, [1, 99.5])
            frame_window = ((lo + hi) / 2, max(hi - lo, 1e-6))
        else:
            frame_window = window
        bases.append(
            _RealBase(source, frame_index, _shrink(frame), frame_window, invert, right_edge, labels)
        )
    return bases


def _real_variant(
    base: _RealBase, v: int, rng: np.random.Generator, size: int
) -> tuple[Image.Image, bool]:
    """Variant v of a real frame: square crop, left-right flip on odd v, display window/gamma."""
    arr = base.pixels
    h, w = arr.shape[:2]
    side = min(h, w)
    if v == 0:
        crop, y0, x0 = side, (h - side) // 2, (w - side) // 2
    else:
        crop = int(side * rng.uniform(0.72, 0.95))
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    arr = arr[y0 : y0 + crop, x0 : x0 + crop]
    if arr.ndim == 2:
        center, width = base.window or (0.5, 1.0)
        if v:
            center += width * rng.uniform(-0.12, 0.12)
            width *= rng.uniform(0.75, 1.3)
        arr = np.clip((arr - (center - width / 2)) / width, 0.0, 1.0)
        if base.invert:
            arr = 1.0 - arr
    else:
        gamma = rng.uniform(0.8, 1.25) if v else 1.0
        arr = np.clip(arr, 0.0, 1.0) ** gamma
    img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    flipped = v % 2 == 1
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img, flipped


_OPPOSITE = {
    "Patient's left": "Patient's right",
    "Patient's right": "Patient's left",
    "Anterior": "Posterior",
    "Posterior": "Anterior",
    "Superior": "Inferior",
    "Inferior": "Superior",
}


def _orientation_rationale(recorded: str, answer: str, flipped: bool) -> str:
    said = f"The orientation recorded in the file's header points the image's right edge {_toward(recorded)}"
    if flipped:
        return (
            f"{said}; this copy is mirrored left-right, so the right edge points {_toward(answer)}."
        )
    return f"{said}, and this copy is not mirrored."


def _toward(direction: str) -> str:
    if direction.startswith("Patient's"):
        return f"to the {direction.lower()} side"
    return f"toward the {direction.lower()} side"


def _real_questions(
    rng: np.random.Generator, base: _RealBase, flipped: bool, n: int, order: OptionOrder
) -> list[Question]:
    style = STYLES[base.source.modality]
    out = [_modality_question(rng, style.modality, REAL_LOOKS[style.modality], n, order)]
    labels = base.labels
    if "anatomy" in labels:
        a = labels["anatomy"]
        out.append(
            Question(
                AI,
                "Which body part or organ does this image show?",
                _options(rng, a, BODY_PARTS, n, order),
                a,
                f"The image shows the {a.lower()}, as the source file's header records.",
                "Look at the shapes of the organs and bones in the picture.",
            )
        )
    if "eye" in labels:
        eye = labels["eye"]
        if flipped:
            eye = "Right eye" if eye == "Left eye" else "Left eye"
        disc_side = "left" if eye == "Left eye" else "right"
        out.append(
            Question(
                AI,
                "Which eye does this fundus photograph show?",
                _options(rng, eye, ("Left eye", "Right eye"), n, order),
                eye,
                f"The bright optic disc lies on the {disc_side} of the image, where the {eye.lower()}'s disc appears.",
                "Find the optic disc: it sits on the same side as the eye.",
            )
        )
    if "diagnosis" in labels:
        d = labels["diagnosis"]
        out.append(
            Question(
                DD,
                "Which diagnosis fits this image?",
                _options(rng, d, base.source.diagnosis_pool, n, order),
                d,
                f"The findings correspond to {d.lower()}, the diagnosis recorded with the source image.",
                "Look for a focal abnormality and what it looks like.",
            )
        )
    if base.right_edge is not None:
        edge = _OPPOSITE[base.right_edge] if flipped else base.right_edge
        out.append(
            Question(
                OBA,
                "Which direction of the patient points toward the right edge of the image?",
                _options(rng, edge, tuple(DIRECTIONS.values()), n, order),
                edge,
                _orientation_rationale(base.right_edge, edge, flipped),
                "Use landmarks whose side is known, such as the heart, the liver or the spine.",
            )
        )
    return out


# ------------------------------------------------------------------------------ build
def _record(
    dataset: str,
    qid: str,
    modality: str,
    image_path: str,
    q: Question,
    image_source: str,
    difficulty: str | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "dataset": dataset,
        "question_id": qid,
        "question_type": q.qtype,
        "question": q.question,
        "gt_answer": q.answer,
        "image_path": image_path,
    }
    rec.update({f"option_{LETTERS[i]}": opt for i, opt in enumerate(q.options)})
    rec["modality_type"] = _RAW_MODALITY[modality]
    rec["image_source"] = image_source
    rec["rationale"] = q.rationale
    rec["reference_hint"] = q.hint
    rec["difficulty"] = difficulty
    return rec


def _save_png(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def difficulty_label(diff: DifficultyConfig) -> str:
    """The `difficulty` string stored with each synthetic question."""
    return (
        f"contrast={diff.contrast:g},lesion_scale={diff.lesion_scale:g},"
        f"distractors={diff.distractors},noise={diff.noise:g},n_options={diff.n_options}"
    )


def _slug(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def build_bundled(out_root: Path, cfg: BundledDatasetConfig) -> Path:
    """Write MiniMedVQA into `out_root` in the OmniMedVQA layout and return `out_root`.

    A folder from an earlier build (it holds a `.minimedvqa` marker) is cleared first; any
    other non-empty folder is refused rather than overwritten.
    """
    out_root = Path(out_root)
    if out_root.exists() and any(out_root.iterdir()):
        if not (out_root / MARKER).is_file():
            raise FileExistsError(
                f"{out_root} is not empty and was not written by build_bundled; choose an empty --out"
            )
        for child in ("QA_information", "Images"):
            shutil.rmtree(out_root / child, ignore_errors=True)
    qa_dir = out_root / QA_SUBDIR
    qa_dir.mkdir(parents=True, exist_ok=True)
    (out_root / MARKER).write_text(json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + "\n")
    datasets: dict[str, list[dict[str, Any]]] = {}

    for mi, modality in enumerate(MODALITIES):
        style = STYLES[modality]
        diff = cfg.difficulty.get(modality, DifficultyConfig())
        label = difficulty_label(diff)
        dataset = f"MiniMed Synthetic {modality}"
        img_dir = out_root / "Images" / dataset
        img_dir.mkdir(parents=True, exist_ok=True)
        records = datasets.setdefault(dataset, [])
        for i in range(cfg.synthetic_per_modality):
            rng = np.random.default_rng([cfg.seed, mi, i])
            pixels, scene = _render(style, rng, cfg.image_size, diff)
            name = f"{_slug(modality)}_{i:05d}.png"
            _save_png(Image.fromarray((pixels * 255 + 0.5).astype(np.uint8)), img_dir / name)
            for q in _synthetic_questions(rng, style, scene, cfg, diff):
                qid = f"minimed-syn-{_slug(modality)}-{i:05d}-{_slug(q.qtype)[:12]}"
                records.append(
                    _record(
                        dataset, qid, modality, f"Images/{dataset}/{name}", q, "synthetic", label
                    )
                )

    if cfg.include_real:
        for si, source in enumerate(REAL_SOURCES):
            diff = cfg.difficulty.get(source.modality, DifficultyConfig())
            dataset = f"MiniMed Real {source.modality}"
            img_dir = out_root / "Images" / dataset
            img_dir.mkdir(parents=True, exist_ok=True)
            records = datasets.setdefault(dataset, [])
            for base in _load_real(source):
                stem = f"{_slug(Path(source.name).stem)}_f{base.frame:02d}"
                for v in range(cfg.real_variants_per_image):
                    rng = np.random.default_rng([cfg.seed, 1000 + si, base.frame, v])
                    img, flipped = _real_variant(base, v, rng, cfg.image_size)
                    name = f"{stem}_v{v:02d}.png"
                    _save_png(img, img_dir / name)
                    for q in _real_questions(rng, base, flipped, diff.n_options, cfg.option_order):
                        qid = f"minimed-real-{stem}-v{v:02d}-{_slug(q.qtype)[:12]}"
                        records.append(
                            _record(
                                dataset,
                                qid,
                                source.modality,
                                f"Images/{dataset}/{name}",
                                q,
                                "real",
                                None,
                            )
                        )

    for dataset, records in datasets.items():
        if records:
            text = json.dumps(records, indent=1, ensure_ascii=False)
            (qa_dir / f"{dataset}.json").write_text(text + "\n", encoding="utf-8")
    log.info("built MiniMedVQA in %s: %d records", out_root, sum(len(r) for r in datasets.values()))
    return out_root
