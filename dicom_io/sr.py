"""The Structured Report a radiologist reads: TID 1500 measurement report from a StudyResult.

The SR is a Comprehensive 3D SR built with highdicom (no hand-made content tree):

- root: TID 1500 "Imaging Measurement Report", Procedure Reported = the imaging
  procedure (e.g. LOINC 24968-0 "MR Lumbar spine"), a device observer context;
- one TID 1410 measurement group per finding, i.e. per (level, condition, side):
  tracking identifier and UID, finding type = the condition, finding site = the
  level (with Left/Right as laterality modifier), the grade as a coded qualitative
  evaluation, the probability of that grade as a numeric measurement in
  UCUM ``{ratio}``, the point on the source image (SCOORD POINT) and TID 4019
  algorithm identification. A group per finding rather than per level, because
  each finding has its own source image, side, probability and model; groups of
  one level share its finding-site code and their tracking identifiers start
  with the level name;
- VerificationFlag UNVERIFIED, Contributing Equipment "Processing Equipment" (DCM
  109102) per model whose Device Serial Number is a device UID derived from the
  weights hash (so it changes whenever a model is retrained; the same UID is the
  Device Observer UID when one model made the report), the evidence in
  Current Requested Procedure Evidence Sequence, patient/study modules and
  Specific Character Set copied from the sources, Predecessor Documents Sequence
  for a new revision.

Every code comes from :mod:`dicom_io.codes`; every UID from :mod:`dicom_io.uids`.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset

from dicom_io import codes
from dicom_io.errors import EncodingError
from dicom_io.results import (
    GRADES,
    LEVELS,
    LUMBAR_SPINE,
    ConditionValues,
    Finding,
    ModelInfo,
    SpineMeasurement,
    StatusValues,
    StudyResult,
)
from dicom_io.uids import SERIES_NUMBERS, deterministic_uid, device_uid, output_uids

#: Series Description of the SR series (LO, at most 64 characters).
SR_SERIES_DESCRIPTION = "Discus AI-generated results - not a diagnosis"
#: Written when no source carries a date, so the output stays deterministic.
_FALLBACK_DATETIME = ("19700101", "000000")

# Attributes highdicom copies into the SR from the first source (Patient / General Study).
_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)

_CONDITION_LABELS = {
    ConditionValues.DISC: "disc",
    ConditionValues.SPINAL_CANAL_STENOSIS: "spinal canal stenosis",
    ConditionValues.NEURAL_FORAMINAL_NARROWING: "foraminal stenosis",
    ConditionValues.SUBARTICULAR_STENOSIS: "subarticular stenosis",
    ConditionValues.SPINE_XRAY: "radiograph",
    ConditionValues.PFIRRMANN: "disc degeneration",
    ConditionValues.DISC_NARROWING: "disc space narrowing",
    ConditionValues.SPONDYLOLISTHESIS: "spondylolisthesis",
    ConditionValues.MODIC: "Modic change",
    ConditionValues.UPPER_ENDPLATE: "upper endplate defect",
    ConditionValues.LOWER_ENDPLATE: "lower endplate defect",
}


def condition_label(finding: Finding) -> str:
    """Short human text of a finding's condition and side, e.g. ``foraminal stenosis left``."""
    text = _CONDITION_LABELS[finding.condition]
    if finding.laterality is not None:
        text += " left" if finding.laterality.value == "L" else " right"
    return text


def grade_label(grade: str) -> str:
    """Human text of a grade (``normal_mild`` -> ``normal/mild``, ``pfirrmann_3`` -> ``Pfirrmann 3``)."""
    if grade.startswith("pfirrmann_"):
        return "Pfirrmann " + grade.rsplit("_", 1)[1]
    return grade.replace("_", "/")


def finding_sort_key(finding: Finding) -> tuple[int, str, str]:
    """Cranial-to-caudal, then condition, then side: the order objects are written in."""
    level_index = LEVELS.index(finding.level) if finding.level in LEVELS else len(LEVELS)
    side = finding.laterality.value if finding.laterality is not None else ""
    return (level_index, finding.condition.value, side)


def model_versions(result: StudyResult) -> list[str]:
    """``name:version`` of every model behind the result (input of the output UIDs)."""
    versions = {f"{m.name}:{m.version}" for m in result.models}
    versions |= {f"{f.model}:{f.model_version}" for f in result.findings}
    return sorted(versions)


def check_sources(result: StudyResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """Validate the source datasets and return them in a stable order (by SOP Instance UID).

    Raises
    ------
    ValueError
        If ``sources`` is empty, a source lacks an attribute the outputs copy,
        belongs to another study, or a finding/level references an image that is
        not among the sources. The message names the field.
    """
    if not sources:
        raise EncodingError("sources: at least one source dataset is required")
    by_uid: dict[str, Dataset] = {}
    for i, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources[{i}]: expected pydicom Dataset, got {type(ds).__name__}")
        for keyword in _REQUIRED_SOURCE_ATTRIBUTES:
            if keyword not in ds:
                raise EncodingError(f"sources[{i}].{keyword}: missing")
        if ds.StudyInstanceUID != result.study_instance_uid:
            raise EncodingError(
                f"sources[{i}].StudyInstanceUID: {ds.StudyInstanceUID} is not the result's "
                f"study {result.study_instance_uid}"
            )
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    for j, f in enumerate(result.findings):
        if f.image.sop_instance_uid not in by_uid:
            raise EncodingError(
                f"findings[{j}].image.sop_instance_uid: {f.image.sop_instance_uid} "
                "is not among the sources"
            )
    return [by_uid[k] for k in sorted(by_uid)]


def content_datetime(sources: Sequence[Dataset]) -> tuple[str, str]:
    """Date and time the outputs carry: the latest acquisition among the sources.

    Taken from the data, never from the clock, so encoding twice gives the same bytes.
    """
    stamps = []
    for ds in sources:
        for date_kw, time_kw in (
            ("ContentDate", "ContentTime"),
            ("AcquisitionDate", "AcquisitionTime"),
            ("SeriesDate", "SeriesTime"),
            ("StudyDate", "StudyTime"),
        ):
            date = str(ds.get(date_kw, "") or "")
            if len(date) == 8 and date.isdigit():
                time = str(ds.get(time_kw, "") or "").split(".")[0]
                time = time if time.isdigit() and len(time) in (2, 4, 6) else "000000"
                stamps.append((date, time.ljust(6, "0")))
                break
    return max(stamps) if stamps else _FALLBACK_DATETIME


def stamp_datetime(ds: Dataset, date: str, time: str) -> None:
    """Replace the clock times highdicom writes (creation, contribution) by the data's time."""
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set, in a form highdicom accepts.

    An empty first value (default repertoire with ISO 2022 code extensions, as in
    ``\\ISO 2022 IR 87``) is written as ``ISO 2022 IR 6``, which PS3.3 C.12.1.1.2
    defines as the same repertoire.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    values = [str(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str) else [value])]
    if len(values) > 1 and values[0].strip() == "":
        values[0] = "ISO 2022 IR 6"
    return values[0] if len(values) == 1 else values


def _model_for(result: StudyResult, finding: Finding | SpineMeasurement) -> ModelInfo | None:
    for m in result.models:
        if m.name == finding.model and m.version == finding.model_version:
            return m
    return None


def _algorithm_id(result: StudyResult, finding: Finding | SpineMeasurement) -> hd.sr.AlgorithmIdentification:
    info = _model_for(result, finding)
    parameters = None
    if info is not None:
        parameters = [f"{k}={v}" for k, v in sorted(info.parameters.items())]
        parameters.append(f"weights_sha256={info.sha256.lower()}")
    return hd.sr.AlgorithmIdentification(
        name=finding.model, version=finding.model_version, parameters=parameters
    )


def contributing_equipment(
    result: StudyResult, manufacturer: str, institution: str | None, when: str
) -> list[hd.ContributingEquipment]:
    """Contributing Equipment items ("Processing Equipment") for the result's models."""
    items = []
    for m in sorted(result.models, key=lambda m: (m.name, m.version)):
        try:
            uid = device_uid(m.sha256)
        except ValueError:
            raise EncodingError(f"models[{m.name}].sha256: expected 64 hex digits, got {m.sha256!r}") from None
        item = hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.code("processing_equipment"),
            manufacturer_model_name=m.name[:64],
            software_versions=m.version[:64],
            # Device UID (0018,1002) is not in the Contributing Equipment Sequence of
            # the IOD tables dciodvfy knows; the serial number carries it instead.
            device_serial_number=uid,
            institution_name=institution,
            contribution_datetime=when,
            contribution_description=f"AI {m.task or 'analysis'}: {m.name} {m.version}"[:64],
        )
        items.append(item)
    return items


def _observer_context(result: StudyResult, manufacturer: str) -> hd.sr.ObservationContext:
    hashes = sorted(m.sha256.lower() for m in result.models)
    # One model: its own device UID; several: one UID for the combination.
    uid = device_uid(hashes[0]) if len(hashes) == 1 else deterministic_uid("discus-observer", *hashes)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid,
        name="Discus",
        manufacturer_name=manufacturer,
        model_name="Discus lumbar spine AI",
    )
    return hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=pydicom.sr.codedict.codes.DCM.Device,
            observer_identifying_attributes=device,
        ),
    )


def _region(finding: Finding, source: Dataset) -> hd.sr.ImageRegion:
    ref = finding.image
    rows, cols = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if rows and cols and not (-0.5 <= ref.row <= rows - 0.5 and -0.5 <= ref.column <= cols - 0.5):
        raise EncodingError(
            f"image.row/column: ({ref.row}, {ref.column}) is outside the {rows}x{cols} source image"
        )
    frames = int(source.get("NumberOfFrames", 1) or 1)
    # SCOORD puts the centre of the top-left pixel at (0.5, 0.5); ImageRef at (0, 0).
    data = np.array([[ref.column + 0.5, ref.row + 0.5]], dtype=float)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame] if frames > 1 else None,
        ),
    )


def _algorithms(result: StudyResult) -> dict[tuple[str, str], hd.sr.AlgorithmIdentification]:
    """TID 4019 Algorithm Identification of every model behind a finding, by (name, version).

    Built once per study and shared by the groups and measurements of that model: the
    same content items then stand in several places of the tree, which is written as
    so many identical copies. Constructing them per group cost about a quarter of the
    groups' time. Do not modify them per group.
    """
    algorithms: dict[tuple[str, str], hd.sr.AlgorithmIdentification] = {}
    for f in result.findings:
        if (f.model, f.model_version) not in algorithms:
            algorithms[(f.model, f.model_version)] = _algorithm_id(result, f)
    return algorithms


def _group(
    result: StudyResult,
    finding: Finding,
    source: Dataset,
    sop_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    site = codes.level_code(finding.level)
    laterality = codes.laterality_code(finding.laterality) if finding.laterality else None
    label = f"{finding.level} {condition_label(finding)}"
    probability = finding.probability
    if not 0.0 <= probability <= 1.0:
        raise EncodingError(f"probabilities[{finding.grade!r}]: must be in [0, 1], got {probability}")
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=deterministic_uid("discus-tracking", sop_uid, label, finding.image.sop_instance_uid),
            identifier=label,
        ),
        referenced_region=_region(finding, source),
        finding_type=codes.condition_code(finding.condition),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site, laterality=laterality)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.condition_code(finding.condition),
                value=codes.grade_code(finding.condition, finding.grade),
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.code("probability" if finding.calibrated else "probability_uncalibrated"),
                value=round(probability, 6),
                unit=codes.code("unit_ratio"),
                algorithm_id=algorithm,
            )
        ],
    )


def _outline_region(points: Sequence[tuple[float, float]], ref: Any, source: Dataset) -> hd.sr.ImageRegion:
    """POLYLINE image region through ``(row, column)`` source pixels (SCOORD: pixel centres at +0.5)."""
    data = np.array([[c + 0.5, r + 0.5] for r, c in points], dtype=float)
    rows, cols = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if rows and cols:
        data[:, 0] = np.clip(data[:, 0], 0.0, cols)
        data[:, 1] = np.clip(data[:, 1], 0.0, rows)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE if len(data) > 1 else hd.sr.GraphicTypeValues.POINT,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame] if frames > 1 else None,
        ),
    )


def _measurement_groups(
    result: StudyResult, by_uid: dict[str, Dataset], sop_uid: str,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per measured structure: its outline on the image, its numbers (UCUM) and grades.

    The numbers of a level (a body's heights, a disc's heights, canal diameter and slip) share the
    structure's outline as their region; lordosis has the two endplate lines as its region.
    """
    if not result.measurements:
        return []
    by_level: dict[str, list[Any]] = {}
    for m in result.measurements:
        by_level.setdefault(m.level, []).append(m)
    cats: dict[str, list[Any]] = {}
    for c in result.categories:
        cats.setdefault(c.level, []).append(c)
    algorithm = _algorithm_id(result, result.measurements[0])  # the same identification as the findings'

    order = {lv: i for i, lv in enumerate(LEVELS)}
    groups = []
    for level in sorted(by_level, key=lambda lv: order.get(lv, len(order))):
        ms = by_level[level]
        ref = ms[0].image
        if ref.sop_instance_uid not in by_uid:
            raise EncodingError(f"measurements[{level}].image: not among the sources")
        region_pts = next((m.region for m in ms if len(m.region) > 1), ()) or ((ref.row, ref.column),)
        site = codes.level_code(level) if level in LEVELS else codes.level_code(LUMBAR_SPINE)
        label = f"{level} measurements"
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=deterministic_uid("discus-tracking", sop_uid, label, ref.sop_instance_uid), identifier=label),
            referenced_region=_outline_region(region_pts, ref, by_uid[ref.sop_instance_uid]),
            finding_type=codes.code("spine_measurements"),
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=site)],
            measurements=[
                hd.sr.Measurement(name=codes.measurement_code(m.name), value=round(m.value, 3),
                                  unit=codes.unit_code(m.unit), algorithm_id=algorithm)
                for m in ms
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(*codes.category_codes(c.name, c.value)) for c in cats.get(level, [])
            ] or None,
        ))
    return groups


def _draft_report(text: str) -> hd.sr.TextContentItem:
    """The AI-generated draft report text, as one TEXT item beside the groups."""
    return hd.sr.TextContentItem(name=codes.code("draft_report"), value=text[:10240],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _check_findings(result: StudyResult) -> None:
    for j, f in enumerate(result.findings):
        if f.level != LUMBAR_SPINE and f.level not in LEVELS:
            raise EncodingError(f"findings[{j}].level: unknown level {f.level!r}")
        codes.level_code(f.level)
        if f.grade not in GRADES[ConditionValues(f.condition)]:
            raise EncodingError(f"findings[{j}].grade: {f.grade!r} is not a grade of {f.condition}")
        if f.grade not in f.probabilities:
            raise EncodingError(f"findings[{j}].probabilities: no probability for grade {f.grade!r}")


def summary_notes(result: StudyResult) -> list[str]:
    """What the radiologist must know beside the findings: analyses withheld and why, then warnings."""
    notes = [f"Not reported: {task}: {why}" for task, why in sorted(result.not_run.items())]
    notes += [f"Warning: {w}" for w in result.warnings]
    return notes


def _summary(status_key: str, reason: str | None = None, notes: Sequence[str] = ()) -> hd.sr.ContainerContentItem:
    """The report's "Qualitative Evaluations" (TID 1500 row 12): the analysis outcome (CID 6047),
    why it was not performed, and what was withheld or must be checked.

    It sits beside the measurement groups, not in one: a viewer that reads TID 1500
    groups expects an image region in each, and an analysis summary has none.
    """
    items: list[Any] = [
        hd.sr.CodeContentItem(
            name=codes.code("analysis_summary"), value=codes.code(status_key),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    if reason:
        items.append(hd.sr.TextContentItem(
            name=codes.code("reason"), value=reason[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    items += [
        hd.sr.TextContentItem(
            name=codes.code("comment"), value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for text in notes
    ]
    container = hd.sr.ContainerContentItem(
        name=codes.code("qualitative_evaluations"), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = items
    return container


def _report(
    result: StudyResult, manufacturer: str, modality: str, groups: list[Any], summary: hd.sr.ContainerContentItem
) -> hd.sr.MeasurementReport:
    placeholder = [] if groups else [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=deterministic_uid("discus-tracking", "none"),
                                                     identifier="none"))]
    report = hd.sr.MeasurementReport(
        observation_context=_observer_context(result, manufacturer),
        procedure_reported=codes.procedure_code(modality),
        imaging_measurements=groups or placeholder,
        title=codes.code("report_title"),
    )
    if not groups:  # highdicom needs a group; a report without findings has no Imaging Measurements
        measurements = _code_key(codes.code("imaging_measurements"))
        report[0].ContentSequence = [i for i in report[0].ContentSequence if _key_of(i) != measurements]
    report[0].ContentSequence.append(summary)
    return report


def _coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=codes.LOCAL_SCHEME,
            name=codes.LOCAL_SCHEME_NAME,
            responsible_organization=codes.LOCAL_SCHEME_ORGANIZATION,
        )
    ]


def _document(
    result: StudyResult,
    evidence: list[Dataset],
    content: hd.sr.MeasurementReport,
    *,
    predecessor: Dataset | None,
    manufacturer: str,
    institution: str | None,
) -> Dataset:
    if predecessor is not None:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in predecessor:
                raise EncodingError(f"predecessor.{keyword}: missing")
        if predecessor.StudyInstanceUID != result.study_instance_uid:
            raise EncodingError("predecessor.StudyInstanceUID: not the result's study")
        if result.revision < 2:
            raise EncodingError("predecessor: only a revision > 1 has a predecessor")
    if not isinstance(manufacturer, str) or not manufacturer:
        raise EncodingError(f"manufacturer: expected a non-empty string, got {manufacturer!r}")
    date, time = content_datetime(evidence)
    series_uid, sop_uid = output_uids(
        result.study_instance_uid, result.revision, model_versions(result), "sr"
    )
    # highdicom's SR constructor deep-copies the content tree it is given, parses the
    # copy back into content items and searches it for image references: more than half
    # of the SR's construction time (19 findings: 0.31 s of 0.56 s), spent re-reading a
    # tree that highdicom's own constructors have just built and checked. So the document
    # is made around the bare root container (header, evidence, equipment) and the tree
    # is attached afterwards, unchanged; _check_references makes highdicom's evidence
    # check on it. New content (measurements, a SEG reference) goes into the groups or
    # the report as before: whatever the root contains is checked and attached.
    root = content[0]
    tree = root.ContentSequence
    _check_references(tree, {str(ds.SOPInstanceUID) for ds in evidence})
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_bare(root),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=sop_uid,
        instance_number=result.revision,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=contributing_equipment(
            result, manufacturer, institution, date + time
        ),
        series_description=f"{SR_SERIES_DESCRIPTION} (revision {result.revision})",
        coding_schemes=_coding_schemes(),
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
        specific_character_set=character_set(evidence[0]),
    )
    sr.ContentSequence = tree
    sr.content[0].ContentSequence = tree  # so that sr.content holds the same tree
    # highdicom stamps the creation time with the clock; the data's time keeps it reproducible.
    stamp_datetime(sr, date, time)
    return sr


def _bare(root: Dataset) -> Dataset:
    """The root container's own attributes (name, value type, template) and no children."""
    bare = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            bare.add(element)
    bare.ContentSequence = []  # highdicom requires the attribute, even empty
    return bare


def _check_references(tree: Sequence[Dataset], evidence: set[str]) -> None:
    """Every image or object the content tree references must be among the evidence.

    The check highdicom's SR constructor makes on the content it is given (see
    :func:`_document`), made here by walking the datasets without re-parsing them.

    Raises
    ------
    EncodingError
        Naming the first referenced SOP Instance UID that is not in ``evidence``.
    """
    pending = list(tree)
    while pending:
        item = pending.pop()
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if uid not in evidence:
                raise EncodingError(f"content: references SOP instance {uid}, which is not among the sources")
        pending.extend(item.get("ContentSequence", ()))


def encode_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    predecessor: Dataset | None = None,
    manufacturer: str = "Discus",
    institution: str | None = None,
) -> Dataset:
    """Encode an analysed :class:`StudyResult` as a Comprehensive 3D SR (TID 1500).

    Parameters
    ----------
    result : StudyResult
        The analysis; status must be ``analysed`` (use :func:`encode_not_performed_sr`
        otherwise).
    sources : sequence of pydicom.Dataset
        Source images of the study (headers suffice): at least every image a
        finding references. All are recorded as evidence; the patient and study
        modules and the Specific Character Set are copied from them.
    predecessor : pydicom.Dataset, optional
        The previous revision's SR, listed in Predecessor Documents Sequence.
    manufacturer : str, optional
        Manufacturer written into the SR and its Contributing Equipment.
    institution : str, optional
        Institution Name of the SR and its Contributing Equipment.

    Returns
    -------
    pydicom.Dataset
        The SR (a :class:`highdicom.sr.Comprehensive3DSR`), same bytes for the same input.

    Raises
    ------
    ValueError
        Bad input, with the field named: not an analysed result, unknown level,
        a finding whose image is not among the sources, a source missing
        attributes, a predecessor of another study.
    """
    if result.status is not StatusValues.ANALYSED:
        raise EncodingError(f"status: {result.status.value}; use encode_not_performed_sr")
    _check_findings(result)
    evidence = check_sources(result, sources)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    _, sop_uid = output_uids(result.study_instance_uid, result.revision, model_versions(result), "sr")
    # Everything the groups share is built once per study; each group holds only what
    # belongs to its finding.
    algorithms = _algorithms(result)
    groups = [
        _group(result, f, by_uid[f.image.sop_instance_uid], sop_uid, algorithms[(f.model, f.model_version)])
        for f in sorted(result.findings, key=finding_sort_key)
    ]
    groups += _measurement_groups(result, by_uid, sop_uid)
    summary = _summary("succeeded_with_findings" if groups else "succeeded_without_findings",
                       notes=summary_notes(result))
    report = _report(result, manufacturer, result.modality, groups, summary)
    if result.draft_report:
        report[0].ContentSequence.append(_draft_report(result.draft_report))
    return _document(
        result, evidence, report, predecessor=predecessor, manufacturer=manufacturer,
        institution=institution,
    )


def encode_not_performed_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    predecessor: Dataset | None = None,
    manufacturer: str = "Discus",
    institution: str | None = None,
) -> Dataset:
    """An SR saying the analysis was not performed, and why.

    One TID 1501 group: qualitative evaluation "CAD Processing and Findings
    Summary" = "No algorithms succeeded; without findings" (CID 6047), and the
    reason as a TEXT "Comment" item.

    Parameters
    ----------
    result : StudyResult
        Status ``not_performed`` with its ``reason``.
    sources, predecessor, manufacturer, institution
        As for :func:`encode_sr`.

    Raises
    ------
    ValueError
        If the result is not ``not_performed`` or the sources are unusable.
    """
    if result.status is not StatusValues.NOT_PERFORMED:
        raise EncodingError(f"status: expected not_performed, got {result.status.value}")
    evidence = check_sources(result, sources)
    _, sop_uid = output_uids(result.study_instance_uid, result.revision, model_versions(result), "sr")
    modality = result.modality if result.modality in ("MR", "CT", "CR", "DX") else "MR"
    report = _report(result, manufacturer, modality, [], _summary("not_performed", reason=str(result.reason),
                                                                   notes=summary_notes(result)))
    return _document(
        result, evidence, report, predecessor=predecessor, manufacturer=manufacturer,
        institution=institution,
    )


def _code_key(concept: Any) -> tuple[str, str]:
    return (str(concept.value), str(concept.scheme_designator))


def read_sr(ds: Dataset) -> list[dict[str, Any]]:
    """Read the findings back from an SR written by :func:`encode_sr` (via highdicom).

    Parameters
    ----------
    ds : pydicom.Dataset
        A Comprehensive 3D SR with a TID 1500 measurement report.

    Returns
    -------
    list of dict
        One dict per measurement group, in document order, with keys ``level``,
        ``condition`` (value of :class:`ConditionValues`), ``laterality``
        (``"L"``, ``"R"`` or ``None``), ``grade``, ``probability``, ``model``,
        ``model_version``, ``sop_instance_uid``, ``row``, ``column`` and
        ``tracking_uid``. A "not performed" SR gives an empty list.

    Raises
    ------
    ValueError
        If a group carries a code that is not in :mod:`dicom_io.codes`.
    """
    report = _report_of(ds)
    out: list[dict[str, Any]] = []
    for group in report.get_planar_roi_measurement_groups():
        if _is_measurement_group(group):
            continue  # spine measurements: read_measurements
        site = group.finding_sites[0]
        level = codes.decode_level(*_code_key(site.value))
        side = None
        for item in getattr(site, "ContentSequence", []):
            side = codes.decode_laterality(
                item.ConceptCodeSequence[0].CodeValue,
                item.ConceptCodeSequence[0].CodingSchemeDesignator,
            ).value
        condition, grade = _evaluation_of(group)
        measurement = (group.get_measurements(name=codes.code("probability"))
                       or group.get_measurements(name=codes.code("probability_uncalibrated")))[0]
        algorithm = _algorithm_of(group)
        roi = group.roi
        column, row = (float(v) - 0.5 for v in roi.value[0])
        source = None
        for item in getattr(roi, "ContentSequence", []):
            if "ReferencedSOPSequence" in item:
                source = item.ReferencedSOPSequence[0]
        out.append(
            {
                "level": level,
                "condition": condition.value,
                "laterality": side,
                "grade": grade,
                "probability": float(measurement.value),
                "model": algorithm[0],
                "model_version": algorithm[1],
                "sop_instance_uid": str(source.ReferencedSOPInstanceUID) if source else None,
                "row": row,
                "column": column,
                "tracking_uid": str(group.tracking_uid),
            }
        )
    return out


def _report_of(ds: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 report of an SR dataset, as highdicom objects."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        report = hd.sr.MeasurementReport.from_sequence(sr.ContentSequence and [sr])
    return report


def _is_measurement_group(group: Any) -> bool:
    return _code_key(group.finding_type) == _code_key(codes.code("spine_measurements"))


def read_measurements(ds: Dataset) -> list[dict[str, Any]]:
    """Read the spine measurements back from an SR written by :func:`encode_sr`.

    Returns one dict per measurement (``level``, ``name`` as the code meaning, ``value``,
    ``unit``) and per derived grade (``level``, ``name``, ``value`` as the code meaning, ``unit`` "").
    """
    report = _report_of(ds)
    out: list[dict[str, Any]] = []
    for group in report.get_planar_roi_measurement_groups():
        if not _is_measurement_group(group):
            continue
        level = str(group.tracking_identifier).rsplit(" measurements", 1)[0]
        for m in group.get_measurements():
            out.append({"level": level, "name": m.name.meaning, "value": float(m.value),
                        "unit": m.unit.value})
        for q in group.get_qualitative_evaluations():
            out.append({"level": level, "name": q.name.meaning, "value": q.value.meaning, "unit": ""})
    return out


def read_draft_report(ds: Dataset) -> str:
    """The AI-generated draft report text of an SR written by :func:`encode_sr` ("" when it has none)."""
    key = _code_key(codes.code("draft_report"))
    for item in ds.ContentSequence:
        if item.ValueType == "TEXT" and _key_of(item) == key:
            return str(item.TextValue)
    return ""


def _evaluation_of(group: Any) -> tuple[ConditionValues, str]:
    """Condition and grade of a measurement group's qualitative evaluation.

    The X-ray condition's concept name is DCM 121071 "Finding", the same name as the
    group's finding type, and highdicom does not list such an item among the group's
    evaluations; so the group's CODE items are searched, last first, for one whose
    name is a condition and whose value is one of its grades.
    """
    found = group.get_qualitative_evaluations()
    if found:
        condition = codes.decode_condition(*_code_key(found[0].name))
        return condition, codes.decode_grade(condition, *_code_key(found[0].value))
    for item in reversed(list(group[0].ContentSequence)):
        if item.ValueType != "CODE":
            continue
        name = item.ConceptNameCodeSequence[0]
        value = item.ConceptCodeSequence[0]
        try:
            condition = codes.decode_condition(name.CodeValue, name.CodingSchemeDesignator)
            return condition, codes.decode_grade(condition, value.CodeValue, value.CodingSchemeDesignator)
        except ValueError:
            continue
    raise ValueError(f"measurement group {group.tracking_uid}: no qualitative evaluation")


def read_status(ds: Dataset) -> tuple[str, str | None]:
    """Analysis outcome of an SR written here: (summary code meaning, reason or ``None``).

    Raises
    ------
    ValueError
        If the SR has no analysis summary group.
    """
    summary_name = _code_key(codes.code("analysis_summary"))
    container = _code_key(codes.code("qualitative_evaluations"))
    for item in ds.ContentSequence:
        if item.ValueType != "CONTAINER" or _key_of(item) != container:
            continue
        outcome = reason = None
        for sub in item.ContentSequence:
            if _key_of(sub) == summary_name:
                outcome = str(sub.ConceptCodeSequence[0].CodeMeaning)
            elif _key_of(sub) == _code_key(codes.code("reason")):
                reason = str(sub.TextValue)
        if outcome is not None:
            return outcome, reason
    raise EncodingError("ds: no analysis summary in the SR")


def read_notes(ds: Dataset) -> list[str]:
    """The SR summary's notes: analyses not reported (with why) and warnings, in the SR's order."""
    container = _code_key(codes.code("qualitative_evaluations"))
    comment = _code_key(codes.code("comment"))
    return [str(sub.TextValue) for item in ds.get("ContentSequence", [])
            if item.ValueType == "CONTAINER" and _key_of(item) == container
            for sub in item.ContentSequence if _key_of(sub) == comment]


def _key_of(item: Dataset) -> tuple[str, str]:
    """(code value, scheme) of a content item's concept name, for datasets and highdicom items alike."""
    name = item.ConceptNameCodeSequence[0]
    value = getattr(name, "value", None) or name.get("CodeValue") or name.get("LongCodeValue")
    return (str(value), str(getattr(name, "scheme_designator", None) or name.CodingSchemeDesignator))


def _algorithm_of(group: Any) -> tuple[str | None, str | None]:
    name = version = None
    for item in group[0].ContentSequence:
        key = _code_key(item.name)
        if key == ("111001", "DCM"):
            name = str(item.TextValue)
        elif key == ("111003", "DCM"):
            version = str(item.TextValue)
    return name, version


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file bytes of a dataset (what is written to the outbox and sent)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
