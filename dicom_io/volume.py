"""A stack of images as a voxel array with its patient geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """Voxel array indexed ``[slice, row, column]`` with a 4x4 affine.

    ``affine @ [column, row, slice, 1]`` gives the voxel centre in DICOM patient
    coordinates (LPS, mm): the affine's columns are the row direction times
    column spacing, the column direction times row spacing, and the slice step
    vector, as built from ImageOrientationPatient, PixelSpacing and
    ImagePositionPatient. Slices are ordered along the slice normal.
    ``sop_instance_uids[k]`` is the source image of slice ``k``.
    """

    array: np.ndarray
    affine: np.ndarray
    sop_instance_uids: list[str]
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    sop_class_uid: str = ""
    frames: list[int] | None = None  # 1-based frame of each slice for multi-frame sources

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"array: expected 3 dimensions, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine: expected 4x4, got {self.affine.shape}")
        if len(self.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                f"sop_instance_uids: {len(self.sop_instance_uids)} for {self.array.shape[0]} slices"
            )

    def voxel_to_patient(self, csr: np.ndarray) -> np.ndarray:
        """(N, 3) voxel coordinates as (column, row, slice) -> (N, 3) patient mm."""
        csr = np.atleast_2d(np.asarray(csr, dtype=float))
        return (self.affine[:3, :3] @ csr.T).T + self.affine[:3, 3]

    def patient_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient mm -> (N, 3) voxel coordinates as (column, row, slice)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        return (np.linalg.inv(self.affine[:3, :3]) @ (xyz - self.affine[:3, 3]).T).T

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(column spacing, row spacing, slice spacing) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))
