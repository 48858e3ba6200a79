"""The phantom writer's clinical MR profile: series, sizes, transfer syntax, and what selection makes of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_io.phantom import (
    CLINICAL_AXIAL_SLICES,
    CLINICAL_LOCALIZER_PER_PLANE,
    CLINICAL_MATRIX,
    CLINICAL_SAGITTAL_SLICES,
    CLINICAL_TRANSFER_SYNTAX,
    write_demo_study,
)
from dicom_io.results import SeriesRoleValues
from dicom_io.selection import assign_roles, orientation_of
from dicom_io.study import Study

EXPECTED = [  # folder, images, orientations
    ("01-3-PLANE_LOCALIZER", 3 * CLINICAL_LOCALIZER_PER_PLANE, {"sagittal", "coronal", "axial"}),
    ("02-SAG_T1_TSE", CLINICAL_SAGITTAL_SLICES, {"sagittal"}),
    ("03-SAG_T2_TSE", CLINICAL_SAGITTAL_SLICES, {"sagittal"}),
    ("04-SAG_STIR", CLINICAL_SAGITTAL_SLICES, {"sagittal"}),
    ("05-AX_T2_TSE", CLINICAL_AXIAL_SLICES, {"axial"}),
    ("06-AX_T2_L3-S1", CLINICAL_AXIAL_SLICES, {"axial"}),
    ("07-AX_T1_TSE", CLINICAL_AXIAL_SLICES, {"axial"}),
]


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clinical")
    write_demo_study(out, "MR", 5, profile="clinical")
    return out


@pytest.mark.slow
def test_clinical_profile_series_sizes_and_transfer_syntax(clinical: Path) -> None:
    truth = json.loads((clinical / "ground_truth.json").read_text())
    assert truth["profile"] == "clinical"
    assert truth["transfer_syntax"] == CLINICAL_TRANSFER_SYNTAX == JPEG2000Lossless
    assert [(s["folder"], s["instances"]) for s in truth["series"]] == [(f, n) for f, n, _ in EXPECTED]
    assert 250 <= sum(n for _, n, _ in EXPECTED) <= 400
    sops = set()
    for folder, n, orientations in EXPECTED:
        files = sorted((clinical / folder).iterdir())
        assert [f.name for f in files] == [f"{i:04d}.dcm" for i in range(1, n + 1)]  # parts merged
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert {h.file_meta.TransferSyntaxUID for h in headers} == {JPEG2000Lossless}
        assert {(h.Rows, h.Columns) for h in headers} == {(CLINICAL_MATRIX, CLINICAL_MATRIX)}
        assert len({h.SeriesInstanceUID for h in headers}) == 1
        assert [h.InstanceNumber for h in headers] == list(range(1, n + 1))
        assert {orientation_of(h.ImageOrientationPatient).value for h in headers} == orientations
        sops |= {h.SOPInstanceUID for h in headers}
    assert len(sops) == sum(n for _, n, _ in EXPECTED)
    ds = pydicom.dcmread(clinical / "03-SAG_T2_TSE" / "0010.dcm")
    pixels = ds.pixel_array
    assert pixels.shape == (CLINICAL_MATRIX, CLINICAL_MATRIX) and pixels.dtype == np.uint16
    assert pixels.max() > 500  # the spine is there, not an empty frame
    assert ds.LossyImageCompression == "00"


@pytest.mark.slow
def test_clinical_profile_selection_takes_the_product_series_and_ignores_the_extras(clinical: Path) -> None:
    study = Study.from_folder(clinical)
    chosen = assign_roles(study)
    assert {role: s.description for role, s in chosen.items()} == {
        SeriesRoleValues.SAG_T1: "SAG T1 TSE",
        SeriesRoleValues.SAG_T2: "SAG T2 TSE",
        SeriesRoleValues.SAG_STIR: "SAG STIR",
        SeriesRoleValues.AX_T2: "AX T2 TSE",  # the L1-S1 stack, not the thin L3-S1 one
    }
    roles = {s.description: s for s in study.series}
    assert roles["3-PLANE LOCALIZER"].role is SeriesRoleValues.OTHER
    assert "localizer" in roles["3-PLANE LOCALIZER"].role_reason
    assert roles["AX T1 TSE"].role is SeriesRoleValues.OTHER
    assert "preferred over" in roles["AX T2 TSE"].role_reason


def test_transfer_syntax_is_lossless_and_keeps_the_default_uids(tmp_path: Path) -> None:
    write_demo_study(tmp_path / "plain", "DX", 2)
    write_demo_study(tmp_path / "rle", "DX", 2, transfer_syntax=RLELossless)
    for plain in sorted((tmp_path / "plain").rglob("*.dcm")):
        a = pydicom.dcmread(plain)
        b = pydicom.dcmread(tmp_path / "rle" / plain.relative_to(tmp_path / "plain"))
        assert b.file_meta.TransferSyntaxUID == RLELossless
        assert (a.SOPInstanceUID, a.SeriesInstanceUID, a.InstanceNumber) == \
            (b.SOPInstanceUID, b.SeriesInstanceUID, b.InstanceNumber)
        assert np.array_equal(a.pixel_array, b.pixel_array)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"profile": "research"}, "profile"),
    ({"modality": "CT", "profile": "clinical"}, "MR profile"),
    ({"transfer_syntax": "1.2.3.4"}, "transfer_syntax"),
    ({"transfer_syntax": "1.2.840.10008.1.2.4.91"}, "transfer_syntax"),  # JPEG 2000, lossy allowed
])
def test_bad_profile_or_transfer_syntax_is_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_demo_study(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # refused before anything was rendered or written
