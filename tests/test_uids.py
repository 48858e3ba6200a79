"""Deterministic UIDs: valid, stable, distinct where inputs differ."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_io.uids import KINDS, deterministic_uid, device_uid, output_uids

UID = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_deterministic_uid_is_valid_and_stable(parts):
    uid = deterministic_uid(*parts)
    assert UID.match(uid) and len(uid) <= 64
    assert uid == deterministic_uid(*parts)


def test_parts_are_not_just_concatenated():
    assert deterministic_uid("a", "bc") != deterministic_uid("ab", "c")


def test_output_uids():
    s1, i1 = output_uids("1.2.3", 1, ["m:1", "n:2"], "sr")
    assert (s1, i1) == output_uids("1.2.3", 1, ["n:2", "m:1"], "sr")  # order-free
    assert output_uids("1.2.3", 2, ["m:1", "n:2"], "sr")[1] != i1
    assert output_uids("1.2.3", 1, ["m:1", "n:3"], "sr")[1] != i1
    uids = {output_uids("1.2.3", 1, ["m:1"], k, i) for k in KINDS for i in range(3)}
    assert len({u[1] for u in uids}) == 3 * len(KINDS)
    assert len({u[0] for u in uids}) == len(KINDS)
    with pytest.raises(ValueError, match="kind"):
        output_uids("1.2.3", 1, [], "pdf")
    with pytest.raises(ValueError, match="revision"):
        output_uids("1.2.3", 0, [], "sr")


def test_device_uid_changes_with_weights():
    assert device_uid("ab" * 32) == device_uid("AB" * 32)
    assert device_uid("ab" * 32) != device_uid("ac" * 32)
    with pytest.raises(ValueError, match="weights_sha256"):
        device_uid("abc")
