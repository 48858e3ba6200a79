"""Provenance of model packages and the policy on what reaches a radiologist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.errors import ConfigError, PackageError
from models.package import SHIPPED_DIR, installed_packages, verify_package
from models.provenance import Provenance

REAL = {
    "training_data": [{"name": "some patients", "kind": "real", "cases": 40},
                      {"name": "phantoms", "kind": "synthetic", "cases": 100}],
    "validation": {"method": "internal cross-validation", "figures": {"accuracy": 0.9}},
    "domain": {"modality": "MR", "series_roles": ["SAG_T2"], "body_part": "lumbar spine"},
}


def test_synthetic_only_means_every_source_synthetic() -> None:
    assert not Provenance.from_dict(REAL).synthetic_only
    phantoms = {**REAL, "training_data": [REAL["training_data"][1]]}
    rec = Provenance.from_dict(phantoms)
    assert rec.synthetic_only
    assert rec.one_line().startswith("[SYNTHETIC ONLY] trained on phantoms (synthetic, 100 cases)")


@pytest.mark.parametrize("bad", [
    {**REAL, "training_data": []},
    {**REAL, "training_data": [{"name": "x", "kind": "imagined", "cases": 3}]},
    {**REAL, "training_data": [{"name": "x", "kind": "real"}]},
    {**REAL, "validation": {"method": "vibes"}},
    {**REAL, "domain": {}},
])
def test_malformed_provenance_is_refused_naming_the_field(bad: dict) -> None:
    with pytest.raises(ConfigError, match="provenance"):
        Provenance.from_dict(bad)


def test_every_shipped_package_declares_provenance_and_verifies() -> None:
    found = {c.task: c for c in installed_packages()}
    on_disk = {json.loads(p.read_text())["task"] for p in SHIPPED_DIR.glob("*/config.json")}
    assert set(found) == on_disk  # none refused, the levels ensemble included
    for cfg in found.values():
        assert cfg.provenance_record is not None, cfg.name
    assert isinstance(found["levels"].weights, list) and not found["levels"].synthetic_only


def test_ensemble_member_tampering_is_refused(tmp_path: Path) -> None:
    pkg = tmp_path / "levels"
    shutil.copytree(SHIPPED_DIR / "levels", pkg)
    verify_package(pkg)
    member = pkg / json.loads((pkg / "config.json").read_text())["weights"][1]
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model-1.safetensors has sha256"):
        verify_package(pkg)


def test_a_package_without_provenance_counts_as_unvalidated() -> None:
    cfg = json.loads((SHIPPED_DIR / "mr_canal" / "config.json").read_text())
    cfg.pop("provenance")
    assert ModelConfig.from_dict(cfg).synthetic_only
