"""Geometry joins of the pipeline on synthetic volumes (no DICOM, no models)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_io.volume import Volume
from worker.geometry import nearest_slice, pick_slice, sagittal_reformat


def _axial(n_slices: int = 20, spacing: float = 4.0, z0: float = -40.0, tilt_deg: float = 0.0) -> Volume:
    """Axial stack 64x64, 1 mm pixels, slices along +z from ``z0`` (optionally tilted about x)."""
    t = np.deg2rad(tilt_deg)
    rdir = np.array([1.0, 0.0, 0.0])
    cdir = np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(rdir, cdir)
    aff = np.eye(4)
    aff[:3, 0] = rdir
    aff[:3, 1] = cdir
    aff[:3, 2] = normal * spacing
    aff[:3, 3] = np.array([-32.0, -32.0, 0.0]) + np.array([0, 0, z0])
    arr = np.zeros((n_slices, 64, 64), np.float32)
    return Volume(arr, aff, [f"1.2.3.{k}" for k in range(n_slices)])


def test_nearest_slice_picks_plane_and_pixel() -> None:
    vol = _axial()
    # Slice k lies at z = -40 + 4k; z = -29 is 1 mm above slice 2 (z = -32)... nearest is 3 (z = -28).
    pick = nearest_slice(vol, [-22.0, -2.0, -29.0])
    assert pick.slice_index == 3
    assert pick.distance_mm == pytest.approx(-1.0)
    assert pick.column == pytest.approx(10.0)
    assert pick.row == pytest.approx(30.0)
    assert pick.inside
    assert pick.snapped_mm[2] == pytest.approx(-28.0)


def test_nearest_slice_beyond_stack_reports_true_distance() -> None:
    vol = _axial()
    pick = nearest_slice(vol, [0.0, 0.0, 100.0])
    assert pick.slice_index == 19
    assert pick.distance_mm == pytest.approx(100.0 - (-40.0 + 4 * 19))


def test_pick_slice_tolerance_and_reason() -> None:
    vol = _axial()
    ok, why = pick_slice([vol], [0.0, 0.0, -29.0], tolerance_mm=4.0)
    assert ok is not None and ok.slice_index == 3 and why == ""
    far, why = pick_slice([vol], [0.0, 0.0, 60.0], tolerance_mm=4.0)
    assert far is None and "mm from the point" in why
    out, why = pick_slice([vol], [500.0, 0.0, -29.0], tolerance_mm=4.0)
    assert out is None and "outside" in why
    none, why = pick_slice([], [0.0, 0.0, 0.0], tolerance_mm=4.0)
    assert none is None and why
    with pytest.raises(ValueError, match="tolerance_mm"):
        pick_slice([vol], [0.0, 0.0, 0.0], tolerance_mm=0.0)
    with pytest.raises(ValueError, match="point_mm"):
        nearest_slice(vol, [0.0, np.nan, 0.0])


def test_pick_slice_prefers_the_stack_through_the_point() -> None:
    # Two angled stacks (one per disc, as scanners do): the point lies on stack 1's plane.
    a = _axial(n_slices=5, spacing=4.0, z0=-60.0, tilt_deg=10.0)
    b = _axial(n_slices=5, spacing=4.0, z0=0.0, tilt_deg=-8.0)
    target = b.voxel_to_patient([20.0, 33.0, 2.0])[0]
    pick, _ = pick_slice([a, b], target, tolerance_mm=2.0)
    assert pick is not None
    assert (pick.volume_index, pick.slice_index) == (1, 2)
    assert abs(pick.distance_mm) < 1e-6
    assert pick.row == pytest.approx(33.0) and pick.column == pytest.approx(20.0)


def test_pick_slice_on_tilted_stack_measures_along_normal() -> None:
    vol = _axial(tilt_deg=20.0)
    on_plane = vol.voxel_to_patient([30.0, 30.0, 7.0])[0]
    _, _, normal = (vol.affine[:3, i] for i in range(3))
    normal = normal / np.linalg.norm(normal)
    pick = nearest_slice(vol, on_plane + 1.5 * normal)
    assert pick.slice_index == 7
    assert pick.distance_mm == pytest.approx(1.5)
    np.testing.assert_allclose(pick.snapped_mm, on_plane, atol=1e-9)


def test_sagittal_reformat_maps_voxels_to_the_same_patient_points() -> None:
    # A bright voxel blob at a known patient point must land at the same point after reformat.
    vol = _axial(n_slices=30, spacing=2.5, z0=-40.0)
    target = np.array([5.0, -10.0, -12.5])  # on slice 11 (z = -40 + 2.5*11)
    c, r, s = np.rint(vol.patient_to_voxel(target)[0]).astype(int)
    vol.array[s - 1 : s + 2, r - 2 : r + 3, c - 2 : c + 3] = 100.0
    arr, aff = sagittal_reformat(vol, inplane_mm=1.0, slice_mm=1.0)
    assert arr.ndim == 3 and arr.dtype == np.float32
    # Sagittal orientation: columns +y (posterior), rows -z (inferior), slices -x.
    np.testing.assert_allclose(aff[:3, 0], [0, 1, 0])
    np.testing.assert_allclose(aff[:3, 1], [0, 0, -1])
    np.testing.assert_allclose(aff[:3, 2], [-1, 0, 0])
    centre = np.array(ndimage.center_of_mass(arr > 50.0))  # slice, row, column
    centre_mm = (aff[:3, :3] @ centre[::-1]) + aff[:3, 3]
    assert np.linalg.norm(centre_mm - target) < 1.0
    # The reformat covers the source extent (64 mm in x and y, 75 mm in z).
    assert 60 <= arr.shape[0] <= 64 and 60 <= arr.shape[2] <= 64 and 70 <= arr.shape[1] <= 75
    with pytest.raises(ValueError, match="slice_mm"):
        sagittal_reformat(vol, slice_mm=0)
    # A narrower reformat keeps the central images, at the same patient positions.
    narrow, naff = sagittal_reformat(vol, inplane_mm=1.0, slice_mm=1.0, width_mm=20.0)
    assert narrow.shape[0] == 20 and narrow.shape[1:] == arr.shape[1:]
    k = int(round(np.linalg.solve(naff[:3, :3], target - naff[:3, 3])[2]))
    k_full = int(round(np.linalg.solve(aff[:3, :3], target - aff[:3, 3])[2]))
    np.testing.assert_allclose(narrow[k], arr[k_full], atol=1e-4)
