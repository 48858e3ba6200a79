"""Regenerate the example key image and heatmap PNGs in docs/ with the shipped models.

A synthetic phantom MR study (seed 3) with chosen findings goes through the pipeline and the
SR/SC encoders; the key image and the L3-L4 canal heatmap SC are rendered to PNG.

    .venv/bin/python docs/make_examples.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pydicom

from dicom_io.phantom import LevelFindings, write_demo_study
from dicom_io.sc import HEATMAP_SERIES_DESCRIPTION, KEY_IMAGE_SERIES_DESCRIPTION, to_png
from worker.pipeline import analyze_study, encode_outputs

DOCS = Path(__file__).resolve().parent
FINDINGS = {
    "L3-L4": LevelFindings(disc="bulging", canal="moderate"),
    "L4-L5": LevelFindings(disc="herniation", disc_side="L", canal="severe", foramen_left="moderate"),
    "L5-S1": LevelFindings(subarticular_right="severe"),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        write_demo_study(study, "MR", seed=3, findings=FINDINGS)
        result = analyze_study(study, 1)
        for f in result.findings:
            if f.severity:
                print(f.level, f.condition.value, f.laterality, f.grade, round(f.probability, 2))
        for path in encode_outputs(result, study, Path(tmp) / "outbox"):
            ds = pydicom.dcmread(path)
            if ds.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION:
                to_png(ds, DOCS / "example_key_image.png")
            elif ds.SeriesDescription == HEATMAP_SERIES_DESCRIPTION and all(
                word in str(ds.get("ImageComments", "")) for word in ("L3-L4", "spinal canal")
            ):
                to_png(ds, DOCS / "example_heatmap_sc.png")


if __name__ == "__main__":
    main()
