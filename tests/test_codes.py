"""The code table: every level/condition/grade has a code, codes round-trip, standard ones match PS3.16."""

from __future__ import annotations

import pytest
from pydicom.sr._concepts_dict import concepts

from dicom_io import codes
from dicom_io.results import GRADES, LEVELS, LUMBAR_SPINE, ConditionValues, LateralityValues


def test_every_level_condition_grade_and_side_round_trips():
    for level in (*LEVELS, LUMBAR_SPINE):
        c = codes.level_code(level)
        assert codes.decode_level(c.value, c.scheme_designator) == level
    for cond in ConditionValues:
        c = codes.condition_code(cond)
        assert codes.decode_condition(c.value, c.scheme_designator) is cond
        for grade in GRADES[cond]:
            g = codes.grade_code(cond, grade)
            assert codes.decode_grade(cond, g.value, g.scheme_designator) == grade
    for side in LateralityValues:
        c = codes.laterality_code(side)
        assert codes.decode_laterality(c.value, c.scheme_designator) is side


def test_codes_claimed_from_ps3_16_are_in_ps3_16():
    """Rows citing PS3.16 must match pydicom's PS3.16-generated concept tables."""
    known = {(scheme, value) for scheme, d in concepts.items() for v in d.values() for value in v}
    for key, entry in codes.CODES.items():
        assert entry.source, key
        if entry.source.startswith("PS3.16"):
            assert (entry.scheme, entry.value) in known, key
        if entry.scheme == codes.LOCAL_SCHEME:
            assert entry.source == "local", key


def test_unique_codes_per_meaning():
    pairs = [(e.scheme, e.value) for e in codes.CODES.values()]
    assert len(pairs) == len(set(pairs))


def test_unknown_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="level"):
        codes.level_code("L6")
    with pytest.raises(ValueError, match="grade"):
        codes.grade_code(ConditionValues.DISC, "severe")
    with pytest.raises(ValueError, match="modality"):
        codes.procedure_code("US")
    with pytest.raises(ValueError, match="finding site"):
        codes.decode_level("123", "SCT")
    assert codes.procedure_code("MR").value == "24968-0"
