"""Every coded concept Discus writes into DICOM, in one table, with where it was verified.

The SR and SC encoders take their codes from :data:`CODES` only, and the SR reader
maps codes back to levels, conditions and grades through the same table, so the
two directions cannot drift apart.

Sources (the ``source`` column of the table):

- ``PS3.16 CID n``: DICOM PS3.16 Context Group *n* (checked against the CID tables
  of PS3.16 as shipped in pydicom's ``pydicom.sr._cid_dict`` /
  ``_concepts_dict``, which are generated from PS3.16).
- ``PS3.16 Annex D``: DICOM Controlled Terminology (DCM codes) in PS3.16 Annex D.
- ``SNOMED CT``: the concept id as published in SNOMED CT International (FSN quoted).
- ``LOINC/RSNA Playbook``: LOINC radiology procedure codes (LOINC/RSNA Radiology
  Playbook), name quoted.
- ``local``: a code of the private coding scheme ``99DISCUS`` (PS3.3 8.2: private
  schemes start with ``99``) used where no standard concept that says exactly
  the same thing was found; the SR declares the scheme in its Coding Scheme
  Identification Sequence.

Post-coordination: every lumbar intervertebral disc has its own SNOMED CT code in
PS3.16 CID 7604, so no disc is post-coordinated from its neighbours. S1 alone has
no code in CID 7603 ("Vertebra" stops at L5): it is written as "Sacrum" (CID 4),
which is unambiguous because S1 is the only sacral level Discus reports.
Laterality of foraminal and subarticular findings is a Laterality (SCT 272741003)
concept modifier of the finding site, as TID 1501 / highdicom ``FindingSite`` do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from pydicom.sr.coding import Code

from dicom_io.results import (
    DISCS,
    GRADES,
    LEVELS,
    LUMBAR_SPINE,
    VERTEBRAE,
    ConditionValues,
    LateralityValues,
)

#: Private coding scheme of this project (PS3.3 8.2, "99" prefix).
LOCAL_SCHEME = "99DISCUS"
LOCAL_SCHEME_NAME = "Discus local codes"
LOCAL_SCHEME_ORGANIZATION = "Discus project"


@dataclass(frozen=True)
class CodeEntry:
    """One row of the code table.

    Parameters
    ----------
    value : str
        Code Value.
    scheme : str
        Coding Scheme Designator (``SCT``, ``DCM``, ``LN``, ``UCUM``, ``99DISCUS``).
    meaning : str
        Code Meaning as written into the objects.
    source : str
        Where the code was verified (standard table or terminology).
    """

    value: str
    scheme: str
    meaning: str
    source: str

    @property
    def code(self) -> Code:
        """The entry as a pydicom/highdicom :class:`~pydicom.sr.coding.Code`."""
        return Code(self.value, self.scheme, self.meaning)


def _e(value: str, scheme: str, meaning: str, source: str) -> CodeEntry:
    return CodeEntry(value, scheme, meaning, source)


# fmt: off
_TABLE: dict[str, CodeEntry] = {
    # --- Anatomy: vertebrae (PS3.16 CID 7603 "Vertebra"; S1 via CID 4) ----------
    "T10": _e("7610001", "SCT", "T10 vertebra", "PS3.16 CID 7603"),
    "T11": _e("12989004", "SCT", "T11 vertebra", "PS3.16 CID 7603"),
    "T12": _e("23215003", "SCT", "T12 vertebra", "PS3.16 CID 7603"),
    "L1": _e("66794005", "SCT", "L1 vertebra", "PS3.16 CID 7603"),
    "L2": _e("14293000", "SCT", "L2 vertebra", "PS3.16 CID 7603"),
    "L3": _e("36470004", "SCT", "L3 vertebra", "PS3.16 CID 7603"),
    "L4": _e("11994002", "SCT", "L4 vertebra", "PS3.16 CID 7603"),
    "L5": _e("49668003", "SCT", "L5 vertebra", "PS3.16 CID 7603"),
    # CID 7603 has no S1; "Sacrum" (CID 4 Anatomic Region) stands for it.
    "S1": _e("54735007", "SCT", "Sacrum", "PS3.16 CID 4 (no S1 in CID 7603)"),
    # --- Anatomy: intervertebral discs (PS3.16 CID 7604 "Intervertebral Disc") --
    "T10-T11": _e("34959001", "SCT", "T10/T11 disc", "PS3.16 CID 7604"),
    "T11-T12": _e("1537001", "SCT", "T11/T12 disc", "PS3.16 CID 7604"),
    "T12-L1": _e("76206002", "SCT", "T12/L1 disc", "PS3.16 CID 7604"),
    "L1-L2": _e("80064006", "SCT", "L1/L2 disc", "PS3.16 CID 7604"),
    "L2-L3": _e("67459009", "SCT", "L2/L3 disc", "PS3.16 CID 7604"),
    "L3-L4": _e("62551000", "SCT", "L3/L4 disc", "PS3.16 CID 7604"),
    "L4-L5": _e("84020006", "SCT", "L4/L5 disc", "PS3.16 CID 7604"),
    "L5-S1": _e("715056000", "SCT", "L5/S1 disc", "PS3.16 CID 7604"),
    # --- Anatomy: region (whole-image X-ray findings) -------------------------
    LUMBAR_SPINE: _e("122496007", "SCT", "Lumbar spine", "PS3.16 CID 4"),
    # --- Laterality (PS3.16 CID 244) -------------------------------------------
    "left": _e("7771000", "SCT", "Left", "PS3.16 CID 244"),
    "right": _e("24028007", "SCT", "Right", "PS3.16 CID 244"),
    # --- Conditions: concept names of the qualitative evaluations -------------
    "spinal_canal_stenosis": _e("76107001", "SCT", "Spinal stenosis",
                                "SNOMED CT 76107001 |Spinal stenosis (disorder)|"),
    # No SNOMED concept for foraminal / subarticular (lateral recess) stenosis was
    # found in PS3.16 or a verifiable SNOMED source: local codes, declared in the SR.
    "neural_foraminal_narrowing": _e("FORAMINAL-STENOSIS", LOCAL_SCHEME,
                                     "Neural foraminal stenosis", "local"),
    "subarticular_stenosis": _e("SUBARTICULAR-STENOSIS", LOCAL_SCHEME,
                                "Subarticular (lateral recess) stenosis", "local"),
    "disc": _e("DISC-CONTOUR", LOCAL_SCHEME, "Intervertebral disc contour", "local"),
    "spine_xray": _e("121071", "DCM", "Finding", "PS3.16 Annex D (DCM 121071)"),
    # --- Grades ------------------------------------------------------------------
    # RSNA "normal/mild" is one category; no single standard concept means that.
    "normal_mild": _e("NORMAL-MILD", LOCAL_SCHEME, "Normal or mild", "local"),
    "moderate": _e("6736007", "SCT", "Moderate", "PS3.16 CID 6130 Severity"),
    "severe": _e("24484000", "SCT", "Severe", "PS3.16 CID 6130 Severity"),
    "normal": _e("17621005", "SCT", "Normal", "PS3.16 CID 222 Normality"),
    "bulging": _e("BULGING-DISC", LOCAL_SCHEME, "Bulging disc", "local"),
    "herniation": _e("73589001", "SCT", "Herniation of intervertebral disc",
                     "SNOMED CT 73589001 |Prolapsed intervertebral disc (disorder)|"),
    "scoliosis": _e("298382003", "SCT", "Scoliosis deformity of spine",
                    "SNOMED CT 298382003 |Scoliosis deformity of spine (disorder)|"),
    "spondylolisthesis": _e("274152003", "SCT", "Spondylolisthesis",
                            "SNOMED CT 274152003 |Spondylolisthesis (disorder)|"),
    # --- Disc grading on the sagittal image -------------------------------------------
    # Spondylolisthesis is the SNOMED concept above (the same code names the condition).
    # No verified SNOMED or RadLex concepts were found for these: local codes, declared.
    "pfirrmann": _e("PFIRRMANN-GRADE", LOCAL_SCHEME, "Pfirrmann grade of disc degeneration", "local"),
    "disc_narrowing": _e("DISC-SPACE-NARROWING", LOCAL_SCHEME, "Intervertebral disc space narrowing", "local"),
    "modic_change": _e("MODIC-CHANGE", LOCAL_SCHEME, "Modic vertebral endplate marrow change", "local"),
    "upper_endplate_defect": _e("UPPER-ENDPLATE-DEFECT", LOCAL_SCHEME,
                                "Upper endplate change or Schmorl node", "local"),
    "lower_endplate_defect": _e("LOWER-ENDPLATE-DEFECT", LOCAL_SCHEME,
                                "Lower endplate change or Schmorl node", "local"),
    **{f"pfirrmann_{g}": _e(f"PFIRRMANN-{g}", LOCAL_SCHEME, f"Pfirrmann grade {g}", "local") for g in range(1, 6)},
    "present": _e("52101004", "SCT", "Present", "SNOMED CT 52101004 |Present (qualifier value)|"),
    "absent": _e("2667000", "SCT", "Absent", "SNOMED CT 2667000 |Absent (qualifier value)|"),
    # --- Spine measurements (segmentation) ------------------------------------------
    # Names of the numeric measurements and of the grades derived from them. No standard
    # concept names "anterior vertebral body height" and the like exactly: local codes,
    # declared; their definitions are in models.measurements (and the conformance notes).
    **{f"measure:{name}": _e(f"SPINE-{name.upper().replace(' ', '-')}", LOCAL_SCHEME, name[:1].upper() + name[1:],
                             "local")
       for name in ("anterior body height", "middle body height", "posterior body height", "wedge ratio",
                    "biconcavity ratio", "body height loss", "disc height anterior", "disc height middle",
                    "disc height posterior", "slip", "slip percent", "canal AP diameter", "lordosis L1-S1")},
    "category:Genant grade": _e("GENANT-GRADE", LOCAL_SCHEME, "Genant semiquantitative fracture grade", "local"),
    **{f"category:Genant grade:{g}": _e(f"GENANT-{g}", LOCAL_SCHEME, f"Genant grade {g}", "local")
       for g in ("0", "1", "2", "3")},
    "category:Meyerding grade": _e("MEYERDING-GRADE", LOCAL_SCHEME, "Meyerding grade of vertebral slip", "local"),
    **{f"category:Meyerding grade:{g}": _e(f"MEYERDING-{g}", LOCAL_SCHEME, f"Meyerding grade {g}", "local")
       for g in ("0", "I", "II", "III", "IV", "V")},
    "category:central canal stenosis": _e("CENTRAL-CANAL-AP-CATEGORY", LOCAL_SCHEME,
                                          "Central canal stenosis by AP diameter", "local"),
    "category:central canal stenosis:relative": _e("RELATIVE-STENOSIS", LOCAL_SCHEME,
                                                   "Relative stenosis (AP diameter 10-13 mm)", "local"),
    "category:central canal stenosis:absolute": _e("ABSOLUTE-STENOSIS", LOCAL_SCHEME,
                                                   "Absolute stenosis (AP diameter < 10 mm)", "local"),
    "spine_measurements": _e("SPINE-MEASUREMENTS", LOCAL_SCHEME, "Spine measurements", "local"),
    "draft_report": _e("AI-DRAFT-REPORT", LOCAL_SCHEME, "AI-generated draft report (unreviewed)", "local"),
    "unit_mm": _e("mm", "UCUM", "millimeter", "PS3.16 CID 7181 (UCUM)"),
    "unit_percent": _e("%", "UCUM", "percent", "PS3.16 CID 7181 (UCUM)"),
    "unit_deg": _e("deg", "UCUM", "degree", "PS3.16 CID 7181 (UCUM)"),
    # --- Measurement -------------------------------------------------------------
    # A bare "Probability" reads as "chance of disease"; these name what the number is.
    "probability": _e("CALIBRATED-PROBABILITY", LOCAL_SCHEME, "Calibrated probability of the reported grade",
                      "local"),
    "probability_uncalibrated": _e("UNCALIBRATED-PROBABILITY", LOCAL_SCHEME,
                                   "Uncalibrated model score for the reported grade",
                                   "local"),
    "unit_ratio": _e("{ratio}", "UCUM", "ratio", "PS3.16 CID 7181 (UCUM)"),
    # --- Procedure reported (TID 1500), per source modality ----------------------
    "procedure_MR": _e("24968-0", "LN", "MR Lumbar spine", "LOINC/RSNA Playbook 24968-0"),
    "procedure_CT": _e("24963-1", "LN", "CT Lumbar spine", "LOINC/RSNA Playbook 24963-1"),
    "procedure_XR": _e("24972-2", "LN", "XR Lumbar spine Views",
                       "LOINC/RSNA Playbook 24972-2"),
    # --- Document and provenance -------------------------------------------------
    "report_title": _e("126000", "DCM", "Imaging Measurement Report",
                       "PS3.16 CID 7021"),
    # CID 7005 has no "Processing Algorithm"; DCM 109103 is "Modifying Equipment".
    # An AI algorithm deriving new objects is "Processing Equipment".
    "processing_equipment": _e("109102", "DCM", "Processing Equipment", "PS3.16 CID 7005"),
    # Analysis summary (the CAD summary concept and its values, CID 6047).
    "analysis_summary": _e("111017", "DCM", "CAD Processing and Findings Summary",
                           "PS3.16 Annex D (DCM 111017)"),
    "succeeded_with_findings": _e("111242", "DCM", "All algorithms succeeded; with findings",
                                  "PS3.16 CID 6047"),
    "succeeded_without_findings": _e("111241", "DCM",
                                     "All algorithms succeeded; without findings",
                                     "PS3.16 CID 6047"),
    "not_performed": _e("111245", "DCM", "No algorithms succeeded; without findings",
                        "PS3.16 CID 6047"),
    "imaging_measurements": _e("126010", "DCM", "Imaging Measurements", "PS3.16 Annex D (DCM 126010)"),
    "reason": _e("NOT-PERFORMED-REASON", LOCAL_SCHEME, "Reason the analysis was not performed", "local"),
    "qualitative_evaluations": _e("C0034375", "UMLS", "Qualitative Evaluations",
                                  "UMLS C0034375, the concept PS3.16 TID 1500 row 12 uses"),
    "comment": _e("121106", "DCM", "Comment", "PS3.16 Annex D (DCM 121106)"),
}
# fmt: on

#: The code table: key -> entry. Read-only.
CODES: Mapping[str, CodeEntry] = MappingProxyType(_TABLE)

_PROCEDURE_BY_MODALITY = {"MR": "procedure_MR", "CT": "procedure_CT", "CR": "procedure_XR",
                          "DX": "procedure_XR", "DR": "procedure_XR", "RG": "procedure_XR"}


def code(key: str) -> Code:
    """Look up a code by its table key.

    Raises
    ------
    ValueError
        If ``key`` is not in the table.
    """
    try:
        return _TABLE[key].code
    except KeyError:
        raise ValueError(f"key: no code for {key!r} in the code table") from None


def level_code(level: str) -> Code:
    """Finding-site code of a level (``L4``, ``L4-L5``) or :data:`LUMBAR_SPINE`.

    Raises
    ------
    ValueError
        If the level is unknown (message names ``level``).
    """
    if level not in LEVELS and level != LUMBAR_SPINE:
        raise ValueError(f"level: unknown level {level!r}; known: {', '.join(LEVELS)}")
    return _TABLE[level].code


def measurement_code(name: str) -> Code:
    """Concept name of a spine measurement (``"anterior body height"``).

    Raises
    ------
    ValueError
        If there is no code for ``name``.
    """
    return code(f"measure:{name}")


def unit_code(unit: str) -> Code:
    """UCUM code of a measurement unit (``mm``, ``%``, ``deg``, ``1``).

    Raises
    ------
    ValueError
        If the unit has no entry.
    """
    key = {"mm": "unit_mm", "%": "unit_percent", "deg": "unit_deg", "1": "unit_ratio"}.get(unit)
    if key is None:
        raise ValueError(f"unit: no UCUM entry for {unit!r}")
    return code(key)


def category_codes(name: str, value: str) -> tuple[Code, Code]:
    """Concept name and value codes of a derived category (``"Meyerding grade"``, ``"II"``).

    Raises
    ------
    ValueError
        If the category or its value has no code.
    """
    key = f"category:{name}:{value}"
    return code(f"category:{name}"), code(key if key in _TABLE else value)  # "normal": the shared code


def laterality_code(laterality: LateralityValues | str) -> Code:
    """Laterality modifier code for a side."""
    side = LateralityValues(laterality)
    return _TABLE["left" if side is LateralityValues.LEFT else "right"].code


def condition_code(condition: ConditionValues | str) -> Code:
    """Concept name of the qualitative evaluation that carries a condition's grade."""
    return _TABLE[ConditionValues(condition).value].code


def grade_code(condition: ConditionValues | str, grade: str) -> Code:
    """Code of a grade of a condition.

    Raises
    ------
    ValueError
        If ``grade`` is not a grade of ``condition``.
    """
    cond = ConditionValues(condition)
    if grade not in GRADES[cond]:
        raise ValueError(f"grade: {grade!r} is not a grade of {cond.value}; known: {GRADES[cond]}")
    return _TABLE[grade].code


def procedure_code(modality: str) -> Code:
    """Procedure Reported for the modality of the analysed images.

    Raises
    ------
    ValueError
        If the modality has no lumbar-spine procedure code.
    """
    try:
        return _TABLE[_PROCEDURE_BY_MODALITY[modality]].code
    except KeyError:
        known = ", ".join(sorted(_PROCEDURE_BY_MODALITY))
        raise ValueError(f"modality: no procedure code for {modality!r}; known: {known}") from None


def _key(value: str, scheme: str) -> tuple[str, str]:
    return (str(value), str(scheme))


_LEVEL_BY_CODE = {_key(_TABLE[k].value, _TABLE[k].scheme): k for k in (*VERTEBRAE, *DISCS, LUMBAR_SPINE)}
_CONDITION_BY_CODE = {
    _key(_TABLE[c.value].value, _TABLE[c.value].scheme): c for c in ConditionValues
}
_SIDE_BY_CODE = {
    _key(_TABLE["left"].value, "SCT"): LateralityValues.LEFT,
    _key(_TABLE["right"].value, "SCT"): LateralityValues.RIGHT,
}


def decode_level(value: str, scheme: str) -> str:
    """Level name of a finding-site code; inverse of :func:`level_code`.

    Raises
    ------
    ValueError
        If the code is not a level code of the table.
    """
    try:
        return _LEVEL_BY_CODE[_key(value, scheme)]
    except KeyError:
        raise ValueError(f"finding site: ({value}, {scheme}) is not a known level code") from None


def decode_condition(value: str, scheme: str) -> ConditionValues:
    """Condition of a qualitative-evaluation concept name; inverse of :func:`condition_code`."""
    try:
        return _CONDITION_BY_CODE[_key(value, scheme)]
    except KeyError:
        raise ValueError(f"condition: ({value}, {scheme}) is not a known condition code") from None


def decode_grade(condition: ConditionValues | str, value: str, scheme: str) -> str:
    """Grade name of a grade code for a condition; inverse of :func:`grade_code`."""
    cond = ConditionValues(condition)
    for grade in GRADES[cond]:
        if _key(_TABLE[grade].value, _TABLE[grade].scheme) == _key(value, scheme):
            return grade
    raise ValueError(f"grade: ({value}, {scheme}) is not a grade of {cond.value}")


def decode_laterality(value: str, scheme: str) -> LateralityValues:
    """Side of a laterality code; inverse of :func:`laterality_code`."""
    try:
        return _SIDE_BY_CODE[_key(value, scheme)]
    except KeyError:
        raise ValueError(f"laterality: ({value}, {scheme}) is not Left or Right") from None
