"""Series selection rules on headers written to disk and read back with load_study."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_io.errors import SeriesSelectionError
from dicom_io.headers import load_study
from dicom_io.results import SeriesRoleValues as R
from dicom_io.selection import (
    DEFAULT_RULES,
    OrientationValues,
    SeriesRule,
    WeightingValues,
    assign_roles,
    classify_series,
    orientation_of,
    select_series,
    series_uses,
    weighting_of,
)
from dicom_io.study import Series
from tests.dicom_samples import AXIAL, CORONAL, SAGITTAL, make_image, write_stack

STUDY = generate_uid()


def stack(root: Path, name: str, n: int, **kwargs: object) -> str:
    series_uid = generate_uid()
    write_stack(root / name, n, study_uid=STUDY, series_uid=series_uid, rows=8, columns=8, **kwargs)
    return series_uid


@pytest.fixture
def lumbar_mr(tmp_path: Path) -> dict[str, str]:
    """A lumbar MR study with the usual series plus a localizer; returns series UIDs by name."""
    root = tmp_path / "study"
    lumbar = {"BodyPartExamined": "LSPINE"}
    uids = {
        "sag_t2": stack(root, "sag_t2", 15, description="SAG T2 TSE", RepetitionTime=3500, EchoTime=100,
                        SeriesNumber=3, **lumbar),
        "sag_t1": stack(root, "sag_t1", 15, description="SAG T1 TSE", RepetitionTime=500, EchoTime=10,
                        SeriesNumber=2, **lumbar),
        "ax_t2": stack(root, "ax_t2", 20, orientation=AXIAL, description="AX T2", RepetitionTime=4000,
                       EchoTime=90, SeriesNumber=4, **lumbar),
        "sag_stir": stack(root, "sag_stir", 15, description="SAG TIRM", SeriesNumber=5, **lumbar),
        # No weighting in the description: TR/TE decide.
        "sag_t2_params": stack(root, "sag_t2_p", 11, description="sag fse", RepetitionTime=3000, EchoTime=110,
                               SeriesNumber=6, **lumbar),
        "localizer": stack(root, "loc", 3, description="3-plane loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                           SeriesNumber=1, **lumbar),
    }
    return uids


def test_lumbar_mr_roles(lumbar_mr: dict[str, str], tmp_path: Path) -> None:
    study = load_study(tmp_path / "study")
    assert study.study_instance_uid == STUDY and study.unreadable == []
    chosen = assign_roles(study)
    roles = {s.series_instance_uid: s.role for s in study.series}
    assert roles[lumbar_mr["sag_t2"]] is R.SAG_T2
    assert roles[lumbar_mr["sag_t1"]] is R.SAG_T1
    assert roles[lumbar_mr["ax_t2"]] is R.AX_T2
    assert roles[lumbar_mr["sag_stir"]] is R.SAG_STIR
    assert roles[lumbar_mr["sag_t2_params"]] is R.SAG_T2
    assert roles[lumbar_mr["localizer"]] is R.OTHER
    # Two SAG_T2 candidates: the one with more images is preferred and comes first.
    assert chosen[R.SAG_T2].series_instance_uid == lumbar_mr["sag_t2"]
    first_t2 = next(s for s in study.series if s.role is R.SAG_T2)
    assert first_t2.series_instance_uid == lumbar_mr["sag_t2"]
    reasons = {s.series_instance_uid: s.role_reason for s in study.series}
    assert "preferred over" in reasons[lumbar_mr["sag_t2"]]
    assert "TR 3000 ms, TE 110 ms" in reasons[lumbar_mr["sag_t2_params"]]
    assert "localizer" in reasons[lumbar_mr["localizer"]]
    assert "sagittal" in reasons[lumbar_mr["sag_t1"]] and "rule SAG_T1" in reasons[lumbar_mr["sag_t1"]]
    uses = series_uses(study)
    assert {u.series_instance_uid: u.role for u in uses} == roles


def test_head_mr_is_not_spine(tmp_path: Path) -> None:
    stack(tmp_path, "head", 20, description="SAG T2", BodyPartExamined="HEAD", RepetitionTime=3000, EchoTime=100)
    stack(tmp_path, "brain", 20, orientation=AXIAL, description="AX T2 BRAIN", RepetitionTime=3000, EchoTime=100)
    study = load_study(tmp_path)
    assign_roles(study)
    assert [s.role for s in study.series] == [R.OTHER, R.OTHER]
    assert any("body part HEAD" in s.role_reason for s in study.series)
    assert any("BRAIN" in s.role_reason for s in study.series)
    with pytest.raises(SeriesSelectionError) as info:
        select_series(study, R.SAG_T2)
    assert len(info.value.candidates) == 2
    assert "not the lumbar spine" in str(info.value)


def test_axial_t1_lists_why_not(tmp_path: Path) -> None:
    stack(tmp_path, "ax_t1", 10, orientation=AXIAL, description="AX T1", BodyPartExamined="LSPINE")
    study = load_study(tmp_path)
    role, reason = classify_series(study.series[0])
    assert role is R.OTHER
    assert "AX_T2: weighting T1, not T2" in reason
    with pytest.raises(SeriesSelectionError, match="AX T1"):
        select_series(study, R.AX_T2)


def test_ct_axial_and_scout(tmp_path: Path) -> None:
    ct = stack(tmp_path, "ct", 40, modality="CT", orientation=AXIAL, description="L-SPINE BONE", step=1.0,
               BodyPartExamined="LSPINE", RescaleSlope=1, RescaleIntercept=-1024)
    stack(tmp_path, "scout", 1, modality="CT", orientation=CORONAL, description="Topogram",
          ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    study = load_study(tmp_path)
    assert select_series(study, R.CT_AXIAL).series_instance_uid == ct
    assert [s.role for s in study.series].count(R.OTHER) == 1


def write_xray(folder: Path, view: str | None, description: str = "", body: str = "LSPINE") -> str:
    series_uid = generate_uid()
    extra = {"ViewPosition": view} if view else {}
    ds = make_image(study_uid=STUDY, series_uid=series_uid, modality="DX", position=None, orientation=None,
                    pixel_spacing=None, description=description, BodyPartExamined=body,
                    ImagerPixelSpacing=[0.15, 0.15], **extra)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{series_uid}.dcm", enforce_file_format=True)
    return series_uid


def test_xray_views(tmp_path: Path) -> None:
    ap = write_xray(tmp_path, "AP")
    lat = write_xray(tmp_path, "LL")
    lat_by_text = write_xray(tmp_path, None, description="L-SPINE LAT")
    chest = write_xray(tmp_path, "PA", body="CHEST")
    study = load_study(tmp_path)
    assign_roles(study)
    roles = {s.series_instance_uid: s.role for s in study.series}
    assert roles == {ap: R.XRAY_AP, lat: R.XRAY_LAT, lat_by_text: R.XRAY_LAT, chest: R.OTHER}


def test_orientation_of() -> None:
    assert orientation_of(SAGITTAL) is OrientationValues.SAGITTAL
    assert orientation_of(AXIAL) is OrientationValues.AXIAL
    assert orientation_of(CORONAL) is OrientationValues.CORONAL
    # 20 degrees oblique sagittal is still sagittal.
    import math

    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    assert orientation_of((s, c, 0, 0, 0, -1)) is OrientationValues.SAGITTAL
    assert orientation_of(None) is OrientationValues.UNKNOWN
    assert orientation_of((1, 0, 0, 1, 0, 0)) is OrientationValues.UNKNOWN


@pytest.mark.parametrize(
    ("description", "tr", "te", "ti", "expected"),
    [
        ("SAG T2 FSE", None, None, None, WeightingValues.T2),
        ("t1_tse_sag", None, None, None, WeightingValues.T1),
        ("SAG STIR", None, None, None, WeightingValues.STIR),
        ("T12 level", 600, 12, None, WeightingValues.T1),  # "T12" is a vertebra, not a weighting
        ("sag", 3000, 100, None, WeightingValues.T2),
        ("sag", 4000, 40, 150, WeightingValues.STIR),
        ("sag", 2000, 40, None, WeightingValues.UNKNOWN),
    ],
)
def test_weighting(description: str, tr: float | None, te: float | None, ti: float | None,
                   expected: WeightingValues) -> None:
    series = Series("1.2", "MR", description=description, repetition_time=tr, echo_time=te, inversion_time=ti)
    assert weighting_of(series)[0] is expected


def test_custom_rules_and_validation() -> None:
    with pytest.raises(ValueError, match="modalities"):
        SeriesRule(R.SAG_T2, ())
    with pytest.raises(ValueError, match="min_images"):
        SeriesRule(R.SAG_T2, ("MR",), min_images=0)
    assert len(DEFAULT_RULES) == 7


def test_unreadable_and_foreign_files_recorded(tmp_path: Path) -> None:
    stack(tmp_path, "ok", 5, description="SAG T2", BodyPartExamined="LSPINE")
    (tmp_path / "junk.dcm").write_bytes(b"garbage")
    other = make_image(study_uid=generate_uid(), series_uid=generate_uid())
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    (tmp_path / "ok" / ".0000.dcm.123.tmp").write_bytes(b"partial")  # a spool temp file: ignored
    study = load_study(tmp_path)
    assert len(study.series) == 1 and len(study.series[0].instances) == 5
    reasons = {p.name: why for p, why in study.unreadable}
    assert set(reasons) == {"junk.dcm", "other.dcm"}
    assert "another study" in reasons["other.dcm"]
