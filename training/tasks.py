"""The classification tasks the worker looks packages up by, with their defaults.

Class names are the product's grades (:data:`dicom_io.results.GRADES`), except
``ct_level`` whose classes are the disc levels of paper A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dicom_io.results import GRADES, ConditionValues
from training.errors import TrainingError


@dataclass(frozen=True)
class TaskSpec:
    """Defaults of one task.

    ``crop_px`` is the side of the raw crop the pipeline cuts (and the network
    input unless ``input_px`` differs); ``preprocessing`` is the model config's
    preprocessing section; ``augmentation`` names a set in :mod:`training.augment`.
    """

    task: str
    class_names: tuple[str, ...]
    modality: str
    crop_px: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    augmentation: str = "none"
    description: str = ""


_MR = {"mode": "percentile", "low": 0.5, "high": 99.5, "mean": 0.5, "std": 0.25}
_CT = {"mode": "window", "center": 100.0, "width": 700.0, "mean": 0.5, "std": 0.25}
_DX = {"mode": "percentile", "low": 0.5, "high": 99.5, "mean": 0.5, "std": 0.25}

TASKS: dict[str, TaskSpec] = {
    "mr_disc": TaskSpec("mr_disc", GRADES[ConditionValues.DISC], "MR", 64, _MR, "paper_a",
                        "disc grade on the axial T2 image through the disc"),
    "mr_canal": TaskSpec("mr_canal", GRADES[ConditionValues.SPINAL_CANAL_STENOSIS], "MR", 64, _MR, "paper_b",
                         "spinal canal stenosis on the mid-sagittal T2 image"),
    "mr_foramen": TaskSpec("mr_foramen", GRADES[ConditionValues.NEURAL_FORAMINAL_NARROWING], "MR", 64, _MR,
                           "paper_b", "neural foraminal narrowing on the parasagittal T1 image (right mirrored)"),
    "mr_subarticular": TaskSpec("mr_subarticular", GRADES[ConditionValues.SUBARTICULAR_STENOSIS], "MR", 64, _MR,
                                "paper_b", "subarticular stenosis on the axial T2 image (right mirrored)"),
    "ct_disc": TaskSpec("ct_disc", GRADES[ConditionValues.DISC], "CT", 96, _CT, "paper_a",
                        "disc bulging / herniation on the axial CT image through the disc (paper A)"),
    "ct_level": TaskSpec("ct_level", ("L3-L4", "L4-L5", "L5-S1"), "CT", 96, _CT, "paper_a",
                         "which disc level an axial CT image shows (paper A)"),
    "xray": TaskSpec("xray", GRADES[ConditionValues.SPINE_XRAY], "DX", 128, _DX, "paper_c",
                     "whole lumbar radiograph: normal, scoliosis, spondylolisthesis (paper C); "
                     "labelled per view: scoliosis on AP, spondylolisthesis on lateral"),
}


def task_spec(task: str) -> TaskSpec:
    """The spec of ``task``.

    Raises
    ------
    TrainingError
        If the task is unknown (the message lists the known ones).
    """
    if task not in TASKS:
        raise TrainingError(f"task: unknown {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]
