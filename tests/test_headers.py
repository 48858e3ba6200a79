"""Study/Series/Instance from headers: synthetic demo studies, real anatomy, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_io.headers import load_study
from dicom_io.results import SeriesRoleValues as R
from dicom_io.selection import assign_roles
from dicom_io.study import Study
from dicom_io.volumes import load_projection, load_volumes
from tests.dicom_samples import SAGITTAL, write_stack

ROOT = Path(__file__).resolve().parents[1]
LEVELS_DATA = ROOT / ".." / "shared" / "data" / "lumbar-mri-levels"


@pytest.fixture(scope="module")
def demo_mr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicom_io.phantom import write_demo_study

    out = tmp_path_factory.mktemp("demo") / "mr"
    write_demo_study(out, modality="MR", seed=3)
    return out


def test_demo_mr_study(demo_mr: Path) -> None:
    study = load_study(demo_mr)
    assert study.unreadable == []  # ground_truth.json beside it is not DICOM and is skipped
    files = sorted(p for p in demo_mr.rglob("*.dcm"))
    first = dcmread(files[0], stop_before_pixels=True)
    assert study.study_instance_uid == first.StudyInstanceUID
    assert sum(len(s.instances) for s in study.series) == len(files)
    assign_roles(study)
    roles = sorted(s.role.value for s in study.series)
    assert roles == ["AX_T2", "SAG_T1", "SAG_T2"]
    for series in study.series:
        inst = series.instances[0]
        assert inst.image_orientation is not None and inst.pixel_spacing is not None
        assert inst.rows and inst.columns and inst.transfer_syntax_uid
        numbers = [i.instance_number for i in series.instances]
        assert numbers == sorted(numbers)  # sorted by InstanceNumber
        [vol] = load_volumes(series)
        assert vol.array.shape[0] == len(series.instances)
        assert vol.series_instance_uid == series.series_instance_uid
    sag = next(s for s in study.series if s.role is R.SAG_T2)
    assert sag.repetition_time is not None and sag.echo_time is not None and sag.modality == "MR"


def test_demo_ct_and_dx(tmp_path: Path) -> None:
    from dicom_io.phantom import write_demo_study

    write_demo_study(tmp_path / "dx", modality="DX", seed=2)
    study = load_study(tmp_path / "dx")
    assign_roles(study)
    assert sorted(s.role.value for s in study.series) == ["XRAY_AP", "XRAY_LAT"]
    image, spacing = load_projection(study.series[0].instances[0].path)
    assert image.ndim == 2 and min(spacing) > 0


@pytest.mark.shared_data
def test_real_anatomy_round_trip(tmp_path: Path) -> None:
    nifti = LEVELS_DATA / "VB2-02.nii.gz"
    if not nifti.exists():
        pytest.skip(f"real level data not found at {LEVELS_DATA}")
    from dicom_io.writer import nifti_to_lps, write_nifti_as_series

    write_nifti_as_series(nifti, tmp_path / "s")
    study = load_study(tmp_path / "s")
    assign_roles(study)
    [series] = study.series
    assert series.role is R.SAG_T2
    [vol] = load_volumes(series)
    expected, affine = nifti_to_lps(nifti)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.array, expected, atol=0.5)


def test_other_study_and_explicit_uid(tmp_path: Path) -> None:
    a, b = generate_uid(), generate_uid()
    write_stack(tmp_path / "a", 3, study_uid=a)
    write_stack(tmp_path / "b", 2, study_uid=b)
    study = load_study(tmp_path)
    assert study.study_instance_uid == a  # most files
    assert len(study.unreadable) == 2 and all("another study" in why for _, why in study.unreadable)
    only_b = load_study(tmp_path, study_instance_uid=b)
    assert [len(s.instances) for s in only_b.series] == [2]
    assert Study.from_folder(tmp_path).study_instance_uid == a


def test_instance_fields_and_duplicates(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, 2, pixel_spacing=(0.5, 0.6), ImageType=["ORIGINAL", "PRIMARY", "M"],
                        SeriesNumber=7, ProtocolName="t2_tse_sag", RepetitionTime=3000.0, EchoTime=95.0)
    (tmp_path / "copy.dcm").write_bytes(paths[0].read_bytes())
    (tmp_path / "missing_uid.dcm").write_bytes(b"")
    ds = dcmread(paths[1])
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "no_series.dcm")
    study = load_study(tmp_path)
    [series] = study.series
    assert series.series_number == 7 and series.protocol_name == "t2_tse_sag"
    assert (series.repetition_time, series.echo_time) == (3000.0, 95.0)
    inst = series.instances[0]
    assert inst.image_orientation == SAGITTAL and inst.pixel_spacing == (0.5, 0.6)
    assert inst.image_type == ("ORIGINAL", "PRIMARY", "M") and inst.slice_thickness == 4.0
    reasons = {p.name: why for p, why in study.unreadable}
    assert "second copy" in reasons["copy.dcm"]  # files are read in name order
    assert "missing SeriesInstanceUID" in reasons["no_series.dcm"]
    assert "not a readable DICOM file" in reasons["missing_uid.dcm"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder"):
        load_study(tmp_path / "absent")
    with pytest.raises(TypeError, match="folder"):
        load_study(3)  # type: ignore[arg-type]
    empty = load_study(tmp_path)
    assert empty.series == [] and empty.study_instance_uid == ""
