"""A DICOM Segmentation (SEG) of the spine masks: vertebral bodies, discs and the spinal canal.

The segmentation model labels some images of a sagittal series; each label mask
is a 2-D integer array on its source image's pixel grid, whose values a
``labels`` mapping names with level names: a vertebra (``"L4"``) for its
vertebral body, a disc (``"L4-L5"``), or ``"canal"`` for the spinal canal; 0 is
background (the scheme of :class:`dicom_io.results.SegmentationMasks`).

:func:`build_segmentation` encodes the masks as one BINARY Segmentation with
highdicom:

- one segment per structure present in at least one mask, cranial to caudal
  (body, disc below it, next body, ...), then the canal; empty segments and
  images without a labelled pixel are left out;
- Segmented Property Category "Anatomical Structure" (SCT 91723000, PS3.16
  CID 7150); Segmented Property Type the level's own code: the vertebra (CID
  7603; S1 written as "Sacrum", as in :mod:`dicom_io.codes`) for a vertebral
  body, the disc (CID 7604) for a disc, "Vertebral canal" (SCT 61853006) for
  the canal. PS3.16 has no "vertebral body" concept that names the level, so
  the Segment Label and Tracking ID say "vertebral body" ("L4 vertebral
  body"), and a Tracking UID identifies each structure;
- Segment Algorithm Type AUTOMATIC, with the algorithm identified by the
  model's name and version, family "Artificial Intelligence" (DCM 123110) and
  the parameters the SR's algorithm identification carries (the model's
  parameters and its weights' SHA-256);
- equipment as in the SR and SC: Manufacturer "Discus", the model as
  Manufacturer's Model Name and Software Versions, the device UID derived from
  the weights as Device Serial Number and in the Contributing Equipment
  ("Processing Equipment"); dates and times from the sources, never the clock,
  so the same input gives the same bytes.

highdicom copies the patient, study and Frame of Reference from the sources,
and lists them in Referenced Series Sequence and each frame's source image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from dicom_io import codes
from dicom_io.errors import EncodingError
from dicom_io.results import LEVELS, ModelInfo, StudyResult
from dicom_io.sr import (
    character_set,
    check_sources,
    content_datetime,
    contributing_equipment,
    stamp_datetime,
)
from dicom_io.uids import deterministic_uid, device_uid

__all__ = ["CANAL", "SEG_SERIES_DESCRIPTION", "build_segmentation", "segment_label"]

#: Level name of the spinal canal in a ``labels`` mapping.
CANAL = "canal"
#: Series Description of the SEG series (LO, at most 64 characters).
SEG_SERIES_DESCRIPTION = "Discus AI segmentation - not for diagnosis"
#: Content Label (CS, upper case, at most 16 characters).
CONTENT_LABEL = "SPINE"
CONTENT_DESCRIPTION = "AI-generated spine segmentation - not a diagnosis"

#: PS3.16 CID 7150 Segmentation Property Category.
ANATOMICAL_STRUCTURE: Code = dicom_codes.SCT.AnatomicalStructure
#: SCT 61853006; pydicom's PS3.16 tables give its meaning as "Vertebral canal".
VERTEBRAL_CANAL: Code = dicom_codes.SCT.VertebralCanal

_VERTEBRA = re.compile(r"^(?:C[1-7]|T(?:[1-9]|1[0-2])|L[1-5]|S1)$")
_REGIONS = "CTLS"
# Beyond what the SR needs of a source (sr.check_sources): the geometry of its frames.
_REQUIRED_SOURCE_ATTRIBUTES = ("FrameOfReferenceUID", "Rows", "Columns")


def _vertebra_rank(name: str) -> int:
    return _REGIONS.index(name[0]) * 100 + int(name[1:])


def _is_disc(name: str) -> bool:
    upper, _, lower = name.partition("-")
    return bool(_VERTEBRA.match(upper) and _VERTEBRA.match(lower))


def segment_label(level: str) -> str:
    """Segment Label of a level name: ``"L4 vertebral body"``, ``"L4-L5 intervertebral disc"``, ``"Spinal canal"``.

    Raises
    ------
    ValueError
        If ``level`` is neither a vertebra (C1-L5, S1), a disc between two of
        them, nor :data:`CANAL`.
    """
    if level == CANAL:
        return "Spinal canal"
    if isinstance(level, str) and _VERTEBRA.match(level):
        return f"{level} vertebral body"
    if isinstance(level, str) and _is_disc(level):
        return f"{level} intervertebral disc"
    raise ValueError(f"level: {level!r} is not a vertebra (L4), a disc (L4-L5) or {CANAL!r}")


def _property_type(level: str) -> Code:
    """Segmented Property Type of a level; the project's code table first, then PS3.16's."""
    if level == CANAL:
        return VERTEBRAL_CANAL
    if level in LEVELS:
        return codes.level_code(level)
    keyword = level.replace("-", "") + ("Disc" if "-" in level else "Vertebra")
    try:
        return getattr(dicom_codes.SCT, keyword)
    except AttributeError:
        raise ValueError(f"level: no PS3.16 code for {level!r}") from None


def _sort_key(level: str) -> tuple[int, int]:
    # Cranial to caudal, each disc right after the vertebra above it; the canal last.
    if level == CANAL:
        return (1, 0)
    upper = level.split("-")[0]
    return (0, 2 * _vertebra_rank(upper) + ("-" in level))


def _check_sources(sources: Sequence[Dataset], provenance: StudyResult) -> dict[str, Dataset]:
    """The sources by SOP Instance UID, in their order; the SR's checks, then the SEG's own."""
    check_sources(provenance, sources)
    by_uid: dict[str, Dataset] = {}
    for i, ds in enumerate(sources):
        for keyword in _REQUIRED_SOURCE_ATTRIBUTES:
            if keyword not in ds:
                raise EncodingError(f"sources[{i}].{keyword}: missing")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise EncodingError(f"sources[{i}].NumberOfFrames: only single-frame sources are supported")
        for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
            if ds[keyword].value != sources[0][keyword].value:
                raise EncodingError(
                    f"sources[{i}].{keyword}: {ds[keyword].value} differs from sources[0]'s "
                    f"{sources[0][keyword].value}; a SEG derives from the images of one series"
                )
        uid = str(ds.SOPInstanceUID)
        if uid in by_uid:
            raise EncodingError(f"sources[{i}].SOPInstanceUID: {uid} occurs twice")
        by_uid[uid] = ds
    return by_uid


def _check_labels(labels: Mapping[int, str]) -> None:
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels: expected a mapping of label value to level name, got {type(labels).__name__}")
    for value, level in labels.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise EncodingError(f"labels: label values must be ints >= 1 (0 is background), got {value!r}")
        try:
            segment_label(level)
            _property_type(level)
        except ValueError as exc:
            raise EncodingError(f"labels[{value}]: {exc}") from None
    names = list(labels.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EncodingError(f"labels: each level needs one label value; repeated: {', '.join(repeated)}")


def _label_counts(
    masks: Mapping[str, np.ndarray], by_uid: Mapping[str, Dataset], labels: Mapping[int, str]
) -> dict[str, np.ndarray]:
    """Check each mask and count its pixels per label value (index = value)."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks: expected a mapping of SOP Instance UID to mask, got {type(masks).__name__}")
    counts: dict[str, np.ndarray] = {}
    for uid, mask in masks.items():
        if uid not in by_uid:
            raise EncodingError(f"masks[{uid!r}]: no source image with this SOP Instance UID in sources")
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"masks[{uid!r}]: expected a numpy array, got {type(mask).__name__}")
        source = by_uid[uid]
        expected = (int(source.Rows), int(source.Columns))
        if mask.shape != expected:
            raise EncodingError(
                f"masks[{uid!r}]: shape {mask.shape} differs from its source image's (Rows, Columns) {expected}"
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise EncodingError(f"masks[{uid!r}]: expected an integer label mask, got dtype {mask.dtype}")
        if mask.dtype != np.bool_ and mask.size and int(mask.min()) < 0:
            raise EncodingError(f"masks[{uid!r}]: negative label value {int(mask.min())}")
        count = np.bincount(mask.ravel().astype(np.intp, copy=False))
        unknown = [v for v in np.flatnonzero(count[1:]) + 1 if int(v) not in labels]
        if unknown:
            raise EncodingError(
                f"masks[{uid!r}]: label value(s) {', '.join(str(int(v)) for v in unknown)} not in labels"
            )
        counts[uid] = count
    return counts


def _algorithm(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    parameters = {str(k): str(v) for k, v in sorted(model.parameters.items())}
    parameters["weights_sha256"] = model.sha256.lower()
    return hd.AlgorithmIdentificationSequence(
        name=model.name[:64],
        family=dicom_codes.DCM.ArtificialIntelligence,
        version=model.version[:64],
        parameters=parameters,
    )


def build_segmentation(
    sources: Sequence[Dataset],
    masks: Mapping[str, np.ndarray],
    labels: Mapping[int, str],
    *,
    model: ModelInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    manufacturer: str = "Discus",
    institution: str | None = None,
    series_description: str = SEG_SERIES_DESCRIPTION,
) -> hd.seg.Segmentation:
    """Encode label masks of some source images as a BINARY DICOM Segmentation.

    Parameters
    ----------
    sources : sequence of pydicom.Dataset
        Single-frame images of one series (headers suffice; pixels are not read),
        at least every image a mask belongs to, with the attributes the SR needs
        of a source (:func:`dicom_io.sr.check_sources`) and a Frame of Reference.
        Patient, study and Frame of Reference are copied from them.
    masks : mapping of str to numpy.ndarray
        SOP Instance UID of a source image -> integer label mask of shape
        (Rows, Columns) of that image; 0 is background.
    labels : mapping of int to str
        Label value -> level name: a vertebra (``"L4"``, its vertebral body), a
        disc (``"L4-L5"``) or ``"canal"``. Every non-zero value in the masks must
        be named; names of values absent from the masks are ignored.
    model : ModelInfo
        The segmentation model: name, version, parameters and weights SHA-256
        identify the algorithm and the equipment.
    series_instance_uid, sop_instance_uid : str
        UIDs of the SEG (deterministic ones, from :mod:`dicom_io.uids`).
    series_number : int
        Series Number of the SEG series.
    instance_number : int, optional
        Instance Number of the SEG, default 1.
    manufacturer : str, optional
        Manufacturer of the SEG and its Contributing Equipment.
    institution : str, optional
        Institution Name of the SEG and its Contributing Equipment.
    series_description : str, optional
        Series Description (at most 64 characters).

    Returns
    -------
    highdicom.seg.Segmentation
        One frame per (source image, segment) with labelled pixels; the same
        input gives the same bytes.

    Raises
    ------
    TypeError
        If an argument has the wrong type (message names it).
    ValueError
        (:class:`~dicom_io.errors.EncodingError`) If every mask is empty, a mask's
        shape differs from its source image's, a mask holds a value ``labels``
        does not name or belongs to no source image, a level name is unknown,
        the sources are not single-frame images of one series, or a model or
        UID value is invalid; the message names the argument and the value.
    """
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError(f"sources: expected a sequence of pydicom Datasets, got {type(sources).__name__}")
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model: expected ModelInfo, got {type(model).__name__}")
    # The SR's helpers take a StudyResult; this one carries the study and the model.
    study = str(getattr(sources[0], "StudyInstanceUID", "")) if sources else ""
    provenance = StudyResult(study_instance_uid=study, revision=1, models=[model])
    by_uid = _check_sources(sources, provenance)
    _check_labels(labels)
    try:
        device = device_uid(model.sha256)
    except ValueError:
        raise EncodingError(f"model.sha256: expected 64 hex digits, got {model.sha256!r}") from None
    if not isinstance(manufacturer, str) or not manufacturer:
        raise EncodingError(f"manufacturer: expected a non-empty string, got {manufacturer!r}")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EncodingError(f"{name}: expected an int >= 1, got {value!r}")

    counts = _label_counts(masks, by_uid, labels)
    present = sorted(
        {int(v) for count in counts.values() for v in np.flatnonzero(count[1:]) + 1},
        key=lambda v: _sort_key(labels[v]),
    )
    if not present:
        raise EncodingError(
            f"masks: every mask is empty ({len(counts)} mask(s), no labelled pixel); "
            "a Segmentation needs at least one segment"
        )
    # Images in the order of sources; those without a labelled pixel get no frame.
    images = [ds for uid, ds in by_uid.items() if uid in counts and counts[uid][1:].any()]

    # Label value -> segment number (1..n, in segment order); highdicom reads a 3-D array of
    # segment numbers as one frame per image and splits it into binary segment frames itself.
    lut = np.zeros(max(present) + 1, dtype=np.uint8 if len(present) < 256 else np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    pixels = np.stack([lut[masks[str(ds.SOPInstanceUID)].astype(np.intp, copy=False)] for ds in images])

    algorithm = _algorithm(model)
    descriptions = []
    for number, value in enumerate(present, start=1):
        level = labels[value]
        text = segment_label(level)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=text,
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=_property_type(level),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=text,
            tracking_uid=deterministic_uid("discus-tracking", sop_instance_uid, text),
        ))

    date, time = content_datetime(images)
    equipment = contributing_equipment(provenance, manufacturer, institution, date + time)
    try:
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=device,
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            content_creator_name=None,
            contributing_equipment=equipment,
            institution_name=institution,
            series_description=series_description[:64],
            content_date=date,
            content_time=time,
            series_date=date,
            series_time=time,
            specific_character_set=character_set(images[0]),
        )
    except ValueError as exc:
        raise EncodingError(f"Segmentation: {exc}") from exc
    stamp_datetime(seg, date, time)
    # highdicom draws the Dimension Organization UID at random; derive it like every other UID.
    dimension_uid = deterministic_uid("discus-dimension-organization", sop_instance_uid)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    return seg
