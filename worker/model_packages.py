"""The installed model packages, loaded once per worker process.

A package is a folder with a ``config.json`` naming its task (``levels``,
``mr_disc``, ...), usually named after the task, in one of the configured model
folders (default ``models/packages``). Every package that
is present is loaded once and kept warm; every one that is absent or fails to
load is recorded with the reason, which the pipeline copies into
``StudyResult.not_run`` instead of inventing a finding.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterable

from dicom_io.results import ModelInfo
from models.config import ModelConfig

log = logging.getLogger(__name__)

#: The project's own package folder, the default when no folder is configured.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "packages"

#: Task of the level localizer package.
LOCALIZER_TASK = "levels"
#: Task of the multi-head disc grader (sagittal MR; not a plain classifier).
DISC_GRADING_TASK = "mr_disc_grading"
#: Task of the sagittal spine segmenter (bodies, discs, canal; the measurements).
SEGMENTATION_TASK = "spine_segmentation"
#: Tasks of the classifier packages the pipeline uses.
CLASSIFIER_TASKS: tuple[str, ...] = (
    "mr_disc",
    "mr_disc_grading",
    "mr_canal",
    "mr_foramen",
    "mr_subarticular",
    "ct_disc",
    "ct_level",
    "xray",
    "xray_spondylolisthesis",
)
TASKS: tuple[str, ...] = (LOCALIZER_TASK, SEGMENTATION_TASK, *CLASSIFIER_TASKS)


def _package_task(folder: Path) -> str | None:
    """The task a package folder declares in its ``config.json`` (None if it is not a package)."""
    try:
        task = json.loads((folder / "config.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None
    return str(task) if task else None


def _config_of(obj: Any) -> ModelConfig | None:
    """The package configuration a loaded localizer or predictor carries (None if it has no valid one)."""
    cfg = getattr(obj, "config", None)
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, dict):
        try:
            return ModelConfig.from_dict(cfg)
        except ValueError:
            return None
    return None


def _find(task: str, dirs: tuple[Path, ...]) -> Path | None:
    """First package folder for ``task``: the folder named after it, else any that declares it."""
    for d in dirs:
        if _package_task(d / task) == task:
            return d / task
        if d.is_dir():
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                if _package_task(sub) == task:
                    return sub
    return None


class ModelPackages:
    """Every installed model package, loaded once.

    Parameters
    ----------
    dirs
        Folders holding one sub-folder per task; the first folder that holds a
        task wins. Default: ``models/packages`` of the project.
    device
        Torch device string for the predictors (``"cpu"``, ``"cuda"``); None
        lets each package choose.
    tasks
        Which tasks to load (default: all of :data:`TASKS`).

    Raises
    ------
    TypeError
        If ``dirs`` is a single string or path instead of a sequence.
    ValueError
        If a task is unknown.
    """

    _shared: dict[tuple[tuple[str, ...], str | None], ModelPackages] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        dirs: Iterable[Path | str] | None = None,
        *,
        device: str | None = None,
        tasks: Iterable[str] | None = None,
    ) -> None:
        if isinstance(dirs, (str, Path)):
            raise TypeError(f"dirs: expected a sequence of folders, got a single {type(dirs).__name__}")
        self.dirs: tuple[Path, ...] = tuple(Path(d) for d in dirs) if dirs else (DEFAULT_MODEL_DIR,)
        self.device = device
        wanted = tuple(tasks) if tasks is not None else TASKS
        unknown = [t for t in wanted if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; known: {', '.join(TASKS)}")
        self.loaded: dict[str, Any] = {}
        self.missing: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.configs: dict[str, ModelConfig] = {}
        for task in TASKS:
            if task not in wanted:
                self.missing[task] = "not requested"
                continue
            self._load(task)

    def _load(self, task: str) -> None:
        folder = _find(task, self.dirs)
        if folder is None:
            where = ", ".join(str(d) for d in self.dirs)
            self.missing[task] = f"no model package installed in {where}"
            return
        try:
            if task == LOCALIZER_TASK:
                from models.localizer import LevelLocalizer

                obj = LevelLocalizer.from_package(folder)
            elif task == SEGMENTATION_TASK:
                from models.segmentation import SpineSegmenter

                obj = SpineSegmenter.from_package(folder)
            elif task == DISC_GRADING_TASK:
                from models.disc_grading import DiscGrader

                obj = DiscGrader.from_package(folder)
            else:
                from models.predictor import Predictor

                obj = Predictor.from_package(folder, **self._device_kw())
        except Exception as exc:  # any failure leaves that analysis not run, with the reason
            log.warning("model package %s failed to load: %s", folder, exc)
            self.missing[task] = f"model package {folder} failed to load: {type(exc).__name__}: {exc}"
            return
        self.loaded[task] = obj
        self.paths[task] = folder
        cfg = _config_of(obj)
        if cfg is not None:
            self.configs[task] = cfg

    @classmethod
    def from_loaded(cls, loaded: dict[str, Any], *, reason: str = "not provided") -> ModelPackages:
        """Packages already in memory (task -> localizer or predictor), e.g. just trained.

        Raises
        ------
        ValueError
            If a task is unknown.
        """
        unknown = [t for t in loaded if t not in TASKS]
        if unknown:
            raise ValueError(f"loaded: unknown tasks {unknown}; known: {', '.join(TASKS)}")
        self = cls(dirs=(), tasks=())
        self.loaded = dict(loaded)
        self.missing = {t: reason for t in TASKS if t not in loaded}
        self.paths = {t: Path(t) for t in loaded}
        self.configs = {t: cfg for t, obj in loaded.items() if (cfg := _config_of(obj)) is not None}
        return self

    def below_target(self, task: str) -> str:
        """The targets the package for ``task`` declares it misses ("" when none, or no declaration)."""
        cfg = self.configs.get(task)
        rec = cfg.provenance_record if cfg is not None else None
        if rec is None or not rec.below_target:
            return ""
        return ", ".join(rec.missed_targets()) or "its declared targets"

    def synthetic_only(self, task: str) -> bool:
        """Whether the package for ``task`` was trained on synthetic data only.

        A package that declares no provenance counts as synthetic-only: nothing
        says it was validated on patients.
        """
        cfg = self.configs.get(task)
        return True if cfg is None else cfg.synthetic_only

    def _device_kw(self) -> dict[str, str]:
        return {"device": self.device} if self.device else {}

    @classmethod
    def shared(cls, dirs: Iterable[Path | str] | None = None, *, device: str | None = None) -> ModelPackages:
        """The process-wide instance for these folders, loaded on first use (warm workers)."""
        key = (tuple(str(Path(d)) for d in dirs) if dirs else (str(DEFAULT_MODEL_DIR),), device)
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(dirs, device=device)
            return cls._shared[key]

    def get(self, task: str) -> Any | None:
        """The loaded localizer or predictor for ``task``, or None if it is not available."""
        return self.loaded.get(task)

    def reason(self, task: str) -> str:
        """Why ``task`` is not available ("" if it is)."""
        return "" if task in self.loaded else self.missing.get(task, f"unknown task {task!r}")

    def info(self, task: str) -> ModelInfo | None:
        """Provenance of the package for ``task`` (None if it is not loaded)."""
        obj = self.loaded.get(task)
        if obj is None:
            return None
        cfg = getattr(obj, "config", None)

        def field(name: str, default: str = "") -> str:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is None and isinstance(cfg, dict):
                value = cfg.get(name)
            return default if value is None else str(value)

        params = {"package": self.paths[task].name}
        size = field("input_size")
        if size:
            params["input_size"] = size
        return ModelInfo(
            name=field("name", task),
            version=field("version", "unknown"),
            task=task,
            sha256=field("sha256", ""),
            parameters=params,
        )

    def __repr__(self) -> str:
        return f"ModelPackages(loaded={sorted(self.loaded)}, missing={sorted(self.missing)})"
