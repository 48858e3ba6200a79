"""Volumes from DICOM series: slice order, affine, geometry errors, rescale, compressed and multi-frame."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from pynetdicom import sop_class

from dicom_io.errors import GeometryError, PixelDataError
from dicom_io.headers import load_study
from dicom_io.volumes import load_projection, load_volume, load_volumes
from tests.dicom_samples import AXIAL, SAGITTAL, make_image, normal_of, write_stack

ORIGIN = np.array([-20.0, -50.0, 60.0])


def oblique_sagittal(deg: float) -> tuple[float, ...]:
    """Sagittal plane turned ``deg`` degrees about the head-foot axis."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return (s, c, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize("orientation", [SAGITTAL, oblique_sagittal(17.0), AXIAL])
def test_reversed_files_sorted_along_normal_and_affine(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    n, step, spacing = 6, 3.5, (0.6, 0.8)  # PixelSpacing is (row spacing, column spacing)
    write_stack(tmp_path, n, orientation=orientation, origin=ORIGIN, step=step, order=[3, 5, 0, 4, 1, 2],
                pixel_spacing=spacing)
    vol = load_volume(load_study(tmp_path).series[0])
    assert vol.array.shape == (n, 16, 12) and vol.array.dtype == np.float32
    assert [int(v) for v in vol.array[:, 0, 0]] == list(range(n))  # slice k holds index k
    normal = normal_of(orientation)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    for c, r, k in [(0, 0, 0), (11, 0, 0), (0, 15, 0), (5, 7, 4), (11, 15, 5)]:
        expected = ORIGIN + k * step * normal + c * spacing[1] * row_dir + r * spacing[0] * col_dir
        np.testing.assert_allclose(vol.voxel_to_patient([c, r, k])[0], expected, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (spacing[1], spacing[0], step), atol=1e-9)
    ds = dcmread(sorted(tmp_path.glob("*.dcm"))[2])  # written third, holds slice 0
    assert vol.sop_instance_uids[0] == ds.SOPInstanceUID
    assert vol.frames is None


def test_missing_geometry_raises(tmp_path: Path) -> None:
    for attr in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        folder = tmp_path / attr
        paths = write_stack(folder, 3)
        ds = dcmread(paths[1])
        delattr(ds, attr)
        ds.save_as(paths[1])
        with pytest.raises(GeometryError, match=attr):
            load_volume(load_study(folder).series[0])
        with pytest.raises(GeometryError, match=attr):
            load_volumes(load_study(folder).series[0])


def test_duplicate_positions_raise(tmp_path: Path) -> None:
    write_stack(tmp_path, 4, order=[0, 1, 2, 2])
    with pytest.raises(GeometryError, match="duplicate slice position"):
        load_volume(load_study(tmp_path).series[0])


def test_single_slice_needs_min_slices_1(tmp_path: Path) -> None:
    write_stack(tmp_path, 1)
    series = load_study(tmp_path).series[0]
    with pytest.raises(GeometryError, match="1 slice where a stack of at least 2"):
        load_volume(series)
    vol = load_volume(series, min_slices=1)
    # One slice: the third axis is the normal times SliceThickness (4 mm in the samples).
    np.testing.assert_allclose(vol.affine[:3, 2], normal_of(SAGITTAL) * 4.0)


def test_non_parallel_slices(tmp_path: Path) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    write_stack(tmp_path / "a", 4, study_uid=study_uid, series_uid=series_uid, orientation=AXIAL)
    write_stack(tmp_path / "b", 3, study_uid=study_uid, series_uid=series_uid, orientation=oblique_sagittal(0),
                origin=(0, 0, 200))
    series = load_study(tmp_path).series[0]
    with pytest.raises(GeometryError, match="non-parallel"):
        load_volume(series)
    vols = load_volumes(series)
    assert [v.array.shape[0] for v in vols] == [4, 3]


def test_uneven_spacing(tmp_path: Path) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    write_stack(tmp_path / "a", 4, study_uid=study_uid, series_uid=series_uid, orientation=AXIAL, step=3.0)
    write_stack(tmp_path / "b", 3, study_uid=study_uid, series_uid=series_uid, orientation=AXIAL, step=3.0,
                origin=ORIGIN + [0, 0, 40])
    series = load_study(tmp_path).series[0]
    with pytest.raises(GeometryError, match="uneven slice spacing"):
        load_volume(series)
    vols = load_volumes(series)  # two blocks at one angle with a gap: two stacks
    assert [v.array.shape[0] for v in vols] == [4, 3]
    np.testing.assert_allclose(vols[1].affine[:3, 3], ORIGIN + [0, 0, 40], atol=1e-9)


def test_bad_orientation_vectors(tmp_path: Path) -> None:
    write_stack(tmp_path, 3, orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(GeometryError, match="orthogonal"):
        load_volume(load_study(tmp_path).series[0])


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_pixels_decode(tmp_path: Path, syntax: str) -> None:
    paths = write_stack(tmp_path, 3, rows=64, columns=64)
    originals = [dcmread(p).pixel_array.astype(np.float32) for p in paths]
    for p in paths:
        ds = dcmread(p)
        ds.compress(syntax)
        ds.save_as(p)
    assert dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    vol = load_volume(load_study(tmp_path).series[0])
    np.testing.assert_array_equal(vol.array, np.stack(originals))


def test_rescale_and_monochrome1(tmp_path: Path) -> None:
    write_stack(tmp_path / "ct", 3, modality="CT", RescaleSlope=2, RescaleIntercept=-1024)
    vol = load_volume(load_study(tmp_path / "ct").series[0])
    raw = dcmread(sorted((tmp_path / "ct").glob("*.dcm"))[0]).pixel_array
    np.testing.assert_array_equal(vol.array[0], raw * 2.0 - 1024)

    write_stack(tmp_path / "m1", 2, PhotometricInterpretation="MONOCHROME1")
    inverted = load_volume(load_study(tmp_path / "m1").series[0]).array
    plain = np.stack([dcmread(p).pixel_array for p in sorted((tmp_path / "m1").glob("*.dcm"))]).astype(np.float32)
    np.testing.assert_array_equal(inverted, 65535.0 - plain)  # over the 16-bit stored range


def test_color_is_refused(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, 2)
    for p in paths:
        ds = dcmread(p)
        ds.PhotometricInterpretation = "RGB"
        ds.save_as(p)
    with pytest.raises(PixelDataError, match="not greyscale"):
        load_volume(load_study(tmp_path).series[0])


def enhanced_mr(path: Path, n_frames: int, step: float, order: list[int]) -> Dataset:
    """An Enhanced MR image with per-frame positions in ``order`` and a shared rescale."""
    study_uid = generate_uid()
    ds = make_image(study_uid=study_uid, series_uid=generate_uid(), sop_class_uid=sop_class.EnhancedMRImageStorage,
                    position=None, orientation=None, pixel_spacing=None)
    del ds.SliceThickness
    frames = np.zeros((n_frames, 16, 12), dtype=np.uint16)
    normal = normal_of(SAGITTAL)
    per_frame = []
    for i, k in enumerate(order):
        frames[i] = k * 10 + 1
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = list(ORIGIN + k * step * normal)
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = list(SAGITTAL)
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.7]
    measures.SliceThickness = step
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 0.5, 3
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = n_frames
    ds.PixelData = frames.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_enhanced_multiframe(tmp_path: Path) -> None:
    ds = enhanced_mr(tmp_path / "emr.dcm", 4, 5.0, order=[2, 0, 3, 1])
    study = load_study(tmp_path)
    inst = study.series[0].instances[0]
    assert inst.number_of_frames == 4 and inst.image_orientation == SAGITTAL
    assert inst.pixel_spacing == (0.7, 0.7)
    vol = load_volume(study.series[0])
    assert vol.frames == [2, 4, 1, 3]  # 1-based frames in slice order
    np.testing.assert_array_equal(vol.array[:, 0, 0], [(k * 10 + 1) * 0.5 + 3 for k in range(4)])
    assert vol.sop_instance_uids == [ds.SOPInstanceUID] * 4
    np.testing.assert_allclose(vol.voxel_to_patient([0, 0, 3])[0], ORIGIN + 15.0 * normal_of(SAGITTAL))


def test_projection(tmp_path: Path) -> None:
    ds = make_image(study_uid=generate_uid(), series_uid=generate_uid(), modality="DX", position=None,
                    orientation=None, pixel_spacing=None, ImagerPixelSpacing=[0.14, 0.15],
                    PhotometricInterpretation="MONOCHROME1")
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    image, spacing = load_projection(tmp_path / "dx.dcm")
    raw = ds.pixel_array.astype(np.float32)
    assert spacing == (0.14, 0.15)
    np.testing.assert_array_equal(image, 65535.0 - raw)
    with pytest.raises(GeometryError, match="ImagePositionPatient"):
        load_volume([tmp_path / "dx.dcm"], min_slices=1)


def test_sr_in_series_is_skipped_and_garbage_raises(tmp_path: Path) -> None:
    write_stack(tmp_path, 3)
    (tmp_path / "zz.dcm").write_bytes(b"junk")
    with pytest.raises(PixelDataError, match="not a readable"):
        load_volume(sorted(tmp_path.glob("*.dcm")))
    with pytest.raises(ValueError, match="min_slices"):
        load_volumes([], min_slices=0)
