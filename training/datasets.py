"""Labelled 2D crops for the classifiers, and the torch dataset that feeds them.

A :class:`CropSet` holds raw crops (scanner units, ``[N, H, W]`` float32), integer
labels, a patient/study group per crop (cross-validation keeps a patient's crops
in one fold) and free-form metadata. Sources: :mod:`training.rsna` (RSNA 2024
layout), :mod:`training.manifest` (folder or CSV of DICOM/PNG images) and
:mod:`training.synthetic` (phantom studies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.preprocess import Preprocessor
from training.augment import Augmenter
from training.errors import DataError


@dataclass
class CropSet:
    """Raw crops with labels and groups.

    Parameters
    ----------
    images : np.ndarray
        ``[N, H, W]`` float32 crops in scanner units.
    labels : np.ndarray
        ``[N]`` class indices into ``class_names``.
    groups : np.ndarray
        ``[N]`` patient or study identifiers (strings).
    class_names : list of str
        Class names in label order.
    meta : list of dict
        Per-crop metadata (level, side, source...); may be empty.
    source : str
        Short description of where the data came from (goes into the model card).

    Raises
    ------
    DataError
        If shapes disagree or a label is out of range.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.groups = np.asarray(self.groups).astype(str)
        if self.images.ndim != 3:
            raise DataError(f"images: expected [N, H, W], got shape {self.images.shape}")
        n = len(self.images)
        if len(self.labels) != n or len(self.groups) != n or (self.meta and len(self.meta) != n):
            raise DataError(
                f"labels/groups/meta: lengths {len(self.labels)}/{len(self.groups)}/{len(self.meta)} "
                f"do not match {n} images"
            )
        if len(self.class_names) < 2:
            raise DataError(f"class_names: need at least 2, got {self.class_names!r}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels: must be in [0, {len(self.class_names)}), got {np.unique(self.labels)}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> CropSet:
        """The crops at ``index`` (indices or boolean mask)."""
        idx = np.arange(len(self))[index]
        return CropSet(self.images[idx], self.labels[idx], self.groups[idx], list(self.class_names),
                       [self.meta[i] for i in idx] if self.meta else [], self.source)

    def counts(self) -> dict[str, int]:
        """Number of crops per class name."""
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.class_names)}

    def summary(self) -> dict[str, Any]:
        """What a model card says about these data."""
        return {"source": self.source, "n_images": len(self), "n_groups": int(len(np.unique(self.groups))),
                "class_counts": self.counts(), "image_shape": list(self.images.shape[1:])}

    def save(self, path: str | Path) -> None:
        """Write as a compressed ``.npz`` (metadata as JSON)."""
        import json

        np.savez_compressed(path, images=self.images, labels=self.labels, groups=self.groups,
                            class_names=np.array(self.class_names),
                            meta=np.array(json.dumps(self.meta)), source=np.array(self.source))

    @classmethod
    def load(cls, path: str | Path) -> CropSet:
        """Read a set written by :meth:`save`.

        Raises
        ------
        DataError
            If the file is missing or not a crop set.
        """
        import json

        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["images"], z["labels"], z["groups"], [str(c) for c in z["class_names"]],
                           json.loads(str(z["meta"])), str(z["source"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"path: {path} is not a readable crop set ({exc})") from None

    @staticmethod
    def concat(sets: list[CropSet]) -> CropSet:
        """Join sets with the same classes and crop shape.

        Raises
        ------
        DataError
            If the sets are empty or disagree on classes or crop shape.
        """
        if not sets:
            raise DataError("sets: nothing to join")
        first = sets[0]
        for s in sets[1:]:
            if s.class_names != first.class_names or s.images.shape[1:] != first.images.shape[1:]:
                raise DataError("sets: class names or crop shapes differ")
        meta = [m for s in sets for m in s.meta] if all(s.meta for s in sets) else []
        return CropSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                       np.concatenate([s.groups for s in sets]), list(first.class_names), meta, first.source)


class CropDataset(Dataset):
    """Torch view of a :class:`CropSet`: preprocessed in one pass, augmented per batch.

    Intensity normalisation and resizing (the deterministic part of the model's
    preprocessing) are applied once at construction; :meth:`batch` augments
    (training only) and standardises, exactly as inference does without augmentation.

    Parameters
    ----------
    crops : CropSet
        The data.
    preprocess : Preprocessor
        The model's preprocessing.
    augment : Augmenter, optional
        Random augmentation applied in training batches.
    """

    def __init__(self, crops: CropSet, preprocess: Preprocessor, augment: Augmenter | None = None) -> None:
        if not isinstance(crops, CropSet):
            raise TypeError(f"crops: must be a CropSet, got {type(crops).__name__}")
        self.crops = crops
        self.preprocess = preprocess
        self.augment = augment
        chunks = [preprocess.resize(preprocess.to_unit(crops.images[i:i + 256]))
                  for i in range(0, len(crops), 256)]
        self.unit = torch.cat(chunks) if chunks else torch.zeros(0, 1, *preprocess.input_size)
        self.labels = torch.as_tensor(crops.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([i]), train=False)
        return x[0], y[0]

    def batch(self, index: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input and labels for ``index``; augmented when ``train`` and an augmenter is set."""
        x = self.unit[index]
        if train and self.augment is not None:
            x = self.augment(x, generator)
        return self.preprocess.standardize(x), self.labels[index]
