"""DICOM series writer and synthetic demo studies: geometry read back, validity, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.phantom import LevelFindings, Tissue, XrayFindings, make_anatomy, render_mr, write_demo_study
from dicom_io.writer import RAS_TO_LPS, StudyInfo, nifti_to_lps, write_nifti_as_series, write_series

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lumbar-mri-levels"


def affine_from_headers(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) rebuilt from the written files' own headers."""
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    iop = np.array(dss[0].ImageOrientationPatient, float)
    rdir, cdir = iop[:3], iop[3:]
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1] = rdir * col_sp, cdir * row_sp
    aff[:3, 3] = np.array(dss[0].ImagePositionPatient, float)
    if len(dss) > 1:
        aff[:3, 2] = np.array(dss[1].ImagePositionPatient, float) - aff[:3, 3]
    else:
        aff[:3, 2] = np.cross(rdir, cdir)
    arr = np.stack([d.pixel_array.astype(float) * float(getattr(d, "RescaleSlope", 1))
                    + float(getattr(d, "RescaleIntercept", 0)) for d in dss])
    return arr, aff


def oblique_affine() -> np.ndarray:
    rot = np.array([[0.0, 0.0, -1.0], [0.96, 0.28, 0.0], [0.28, -0.96, 0.0]]).T
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.8, 4.4])
    aff[:3, 3] = [12.5, -40.25, 88.0]
    return aff


def test_mr_series_reads_back_with_its_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, (4, 20, 24)).astype(np.float32)
    aff = oblique_affine()
    files = write_series(arr, aff, tmp_path, series_description="SAG T2", series_number=3,
                         extra={"SliceThickness": 4.0, "EchoTime": 95.0})
    assert [f.name for f in files] == ["0001.dcm", "0002.dcm", "0003.dcm", "0004.dcm"]
    back, back_aff = affine_from_headers(files)
    assert np.allclose(back_aff, aff, atol=1e-4)
    assert np.array_equal(back, np.round(arr))
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.PatientName == "SYNTHETIC^PHANTOM" and ds.BodyPartExamined == "LSPINE"
    assert float(ds.SliceThickness) == 4.0 and np.isclose(float(ds.SpacingBetweenSlices), 4.4)
    assert float(ds.EchoTime) == 95.0 and ds.SeriesNumber == 3
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == 4
    assert len({pydicom.dcmread(f).FrameOfReferenceUID for f in files}) == 1


def test_ct_series_stores_hounsfield_units(tmp_path: Path) -> None:
    arr = np.array([[[-1000.0, -100.0], [40.0, 1500.0]]], np.float32)
    files = write_series(arr, np.diag([0.7, 0.7, 3.0, 1.0]), tmp_path, modality="CT")
    back, _ = affine_from_headers(files)
    assert np.array_equal(back, arr)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.PixelRepresentation == 1
    assert ds.RescaleType == "HU"


def test_writer_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modality"):
        write_series(np.zeros((1, 4, 4)), np.eye(4), tmp_path, modality="US")
    with pytest.raises(ValueError, match="array"):
        write_series(np.zeros((4, 4)), np.eye(4), tmp_path)
    with pytest.raises(ValueError, match="DX"):
        write_series(np.zeros((2, 4, 4)), np.eye(4), tmp_path, modality="DX")
    bad = np.eye(4)
    bad[:3, 1] = [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="orthogonal"):
        write_series(np.zeros((1, 4, 4)), bad, tmp_path)
    with pytest.raises(ValueError, match="study_date"):
        StudyInfo(study_date="2024-01-01")


@pytest.fixture(scope="module")
def mr_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mr")
    f = {"L4-L5": LevelFindings(disc="herniation", disc_side="L", canal="severe")}
    return write_demo_study(out, "MR", seed=5, findings=f)


def series_files(study_json: Path) -> dict[str, list[Path]]:
    truth = json.loads(study_json.read_text())
    return {s["description"]: sorted((study_json.parent / s["folder"]).glob("*.dcm")) for s in truth["series"]}


def test_demo_mr_study_layout_and_ground_truth(mr_study: Path) -> None:
    truth = json.loads(mr_study.read_text())
    files = series_files(mr_study)
    assert list(files) == ["SAG T2 TSE", "SAG T1", "AX T2"]
    assert truth["findings"]["L4-L5"]["canal"] == "severe" and truth["xray"] == "normal"
    study_uids, frames, series_uids = set(), set(), set()
    for desc, fs in files.items():
        assert len(fs) >= 12
        for f in (fs[0], fs[-1]):
            ds = pydicom.dcmread(f)
            study_uids.add(ds.StudyInstanceUID)
            frames.add(ds.FrameOfReferenceUID)
            series_uids.add(ds.SeriesInstanceUID)
    assert study_uids == {truth["study_instance_uid"]} and len(frames) == 1 and len(series_uids) == 3
    # Ground-truth points land in bone and disc of the written sagittal T2, via its headers.
    an = make_anatomy(5, {"L4-L5": LevelFindings(disc="herniation", disc_side="L", canal="severe")})
    rendered = render_mr(an, "T2", "sagittal")
    arr, aff = affine_from_headers(files["SAG T2 TSE"])
    assert np.allclose(aff, rendered.affine, atol=1e-3)
    inv = np.linalg.inv(aff)
    for name in ("L2", "L4", "L4-L5", "L5-S1"):
        c, r, s = np.round(inv @ np.r_[truth["levels"][name], 1.0])[:3].astype(int)
        lab = Tissue(int(rendered.labels[s, r, c]))
        expected = {Tissue.ANNULUS, Tissue.NUCLEUS, Tissue.NUCLEUS_DEGENERATED,
                    Tissue.NUCLEUS_DESICCATED} if "-" in name else {
            Tissue.MARROW, Tissue.CORTEX}
        assert lab in expected, f"{name} on {lab.name}"


def test_demo_series_pass_dciodvfy(mr_study: Path, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    from dicom_io.validate import dciodvfy

    ct = write_demo_study(tmp_path / "ct", "CT", seed=2)
    dx = write_demo_study(tmp_path / "dx", "DX", seed=2)
    checked = []
    for study in (mr_study, ct, dx):
        for desc, fs in series_files(study).items():
            report = dciodvfy(fs[0])
            assert report.ok, f"{desc}: {report.errors}"
            checked.append(report.iod)
    assert checked.count("MRImage") == 3 and "CTImage" in checked
    assert checked.count("DXImageForPresentation") == 2


def test_demo_study_is_byte_identical_per_seed(tmp_path: Path) -> None:
    a = write_demo_study(tmp_path / "a", "DX", seed=9, xray=XrayFindings("spondylolisthesis"))
    b = write_demo_study(tmp_path / "b", "DX", seed=9, xray=XrayFindings("spondylolisthesis"))
    c = write_demo_study(tmp_path / "c", "DX", seed=10, xray=XrayFindings("spondylolisthesis"))
    fa = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    assert fa == fb and len(fa) == 3
    for rel in fa:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    assert (a.parent / fa[0]).read_bytes() != (c.parent / fa[0]).read_bytes()
    views = [pydicom.dcmread(f).ViewPosition for f in sorted(a.parent.rglob("*.dcm"))]
    assert views == ["AP", "LL"]


def test_demo_mr_study_is_byte_identical(mr_study: Path, tmp_path: Path) -> None:
    f = {"L4-L5": LevelFindings(disc="herniation", disc_side="L", canal="severe")}
    again = write_demo_study(tmp_path, "MR", seed=5, findings=f)
    assert again.read_bytes() == mr_study.read_bytes()
    for desc, fs in series_files(mr_study).items():
        other = series_files(again)[desc]
        assert [p.read_bytes() for p in fs] == [p.read_bytes() for p in other], desc


def test_nifti_to_lps_keeps_the_geometry_exact(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    data = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    # The shared data's layout: i superior->inferior, j anterior->posterior, k left-right.
    ras = np.array([[0.0, 0.0, -1.0, 10.0], [0.0, -1.0, 0.0, -127.0], [-1.0, 0.0, 0.0, 5.0], [0, 0, 0, 1]])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, ras), str(path))
    vol, aff = nifti_to_lps(path)
    assert vol.shape == (5, 6, 7)  # slices along k (left-right), rows head-foot, columns AP
    assert aff[2, 1] < 0 and aff[1, 0] > 0  # rows go inferior, columns go posterior
    for ijk in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        lps = (RAS_TO_LPS @ ras @ np.r_[ijk, 1.0])[:3]
        c, r, s = np.round(np.linalg.inv(aff) @ np.r_[lps, 1.0])[:3].astype(int)
        assert vol[s, r, c] == data[ijk]


def test_nifti_series_maps_levels_json_points(tmp_path: Path) -> None:
    if not (DATA / "levels.json").is_file():
        pytest.skip(f"real level data not found at {DATA}")
    case = json.loads((DATA / "levels.json").read_text())["cases"]["VB2-02"]
    files = write_nifti_as_series(DATA / case["image"], tmp_path / "img")
    arr, aff = affine_from_headers(files)
    import nibabel as nib

    src = np.asarray(nib.load(str(DATA / case["image"])).dataobj)
    inv = np.linalg.inv(aff)
    items = list(case["vertebrae"].items())
    assert len(items) >= 5
    for name, v in items:
        ijk = np.round(v["centroid"]["vox"]).astype(int)
        lps = (RAS_TO_LPS @ np.r_[v["centroid"]["mm"], 1.0])[:3]
        c, r, s = np.round(inv @ np.r_[lps, 1.0])[:3].astype(int)
        assert arr[s, r, c] == src[tuple(ijk)], name
    # Resampled to 4 mm slabs, the labelled vertebra is still under each centroid.
    lab_files = write_nifti_as_series(DATA / case["labels"], tmp_path / "lab", slice_thickness=4.0)
    labs, lab_aff = affine_from_headers(lab_files)
    assert np.isclose(np.linalg.norm(lab_aff[:3, 2]), 4.0)
    assert float(pydicom.dcmread(lab_files[0]).SliceThickness) == 4.0
    inv4 = np.linalg.inv(lab_aff)
    for name, v in items:
        lps = (RAS_TO_LPS @ np.r_[v["centroid"]["mm"], 1.0])[:3]
        c, r, s = np.round(inv4 @ np.r_[lps, 1.0])[:3].astype(int)
        assert labs[s, r, c] > 0, name
