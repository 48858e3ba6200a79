"""The layers of the design hold in the import graph, nested imports included.

``dicom_io`` imports no torch, Celery, models, worker or training; ``models`` no
pydicom, highdicom, pynetdicom, worker or training; ``training`` no worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "dicom_io": {"torch", "torchvision", "timm", "pytorch_grad_cam", "celery", "models", "worker", "training"},
    "models": {"pydicom", "highdicom", "pynetdicom", "celery", "worker", "training", "dicom_io"},
    "training": {"worker", "celery"},
}


def imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}: no modules found"
    bad = {str(f.relative_to(ROOT)): sorted(imports(f) & FORBIDDEN[package]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package} breaks its layer: {bad}"


def test_the_check_sees_nested_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from worker.cli import main\n    import torch.nn\n")
    assert imports(f) == {"worker", "torch"}
