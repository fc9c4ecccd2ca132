"""The OmniMedVQA open-access release's folder layout and verbatim strings.

    ROOT/QA_information/Open-access/<Dataset>.json    each a JSON list of records
    ROOT/<image_path>                                images; `image_path` is relative to ROOT

`kepo.curate` reads this layout; `kepo.bundled` writes MiniMedVQA in it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

QA_SUBDIR = PurePosixPath("QA_information/Open-access")

# The eight `modality_type` strings of the open-access release, verbatim (typos included).
OMNIMEDVQA_MODALITY_STRINGS: dict[str, str] = {
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "CT(Computed Tomography)": "CT",
    "X-Ray": "X-Ray",
    "ultrasound": "Ultrasound",
    "Dermoscopy": "Dermoscopy",
    "Fundus Photography": "Fundus",
    "OCT (Optical Coherence Tomography": "OCT",
    "Microscopy Images": "Microscopy",
}
