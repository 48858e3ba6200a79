"""Daemon configuration: one :class:`Settings` object read from the environment and a TOML file.

Precedence, highest first: keyword arguments, environment variables (prefix ``DISCUS_``,
nested keys joined by ``__``), the file named by ``DISCUS_CONFIG`` (or passed to
:meth:`Settings.load`): TOML, or ``DISCUS_KEY=value`` lines when its name ends in ``.env``;
then the defaults below. ``deploy/discus.example.toml`` documents
every key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: The project root (the folder holding ``pyproject.toml``); runtime data defaults to ``var/`` in it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Environment variable naming the TOML configuration file.
CONFIG_ENV = "DISCUS_CONFIG"


class Destination(BaseModel):
    """A PACS the results are sent to, by C-STORE (``dicom``) or STOW-RS (``dicomweb``)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dicom", "dicomweb"] = "dicom"
    host: str = "127.0.0.1"
    port: int = Field(default=4242, ge=1, le=65535)
    ae_title: str = Field(default="ORTHANC", min_length=1, max_length=16)
    url: str | None = None  # DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web
    username: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _url_for_dicomweb(self) -> Destination:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError(f"url: destination {self.name!r} of kind dicomweb needs a url")
        return self


class Settings(BaseSettings):
    """Everything the listener, the workers and the CLI read.

    Parameters are the fields below; see ``deploy/discus.example.toml`` for their meaning.

    Raises
    ------
    pydantic.ValidationError
        A value is out of range or of the wrong type (a subclass of ``ValueError``).
    """

    model_config = SettingsConfigDict(
        env_prefix="DISCUS_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    # Listener (DICOM SCP)
    ae_title: str = Field(default="DISCUS", min_length=1, max_length=16)
    port: int = Field(default=11112, ge=1, le=65535)
    bind: str = "127.0.0.1"
    allowed_calling_aets: list[str] = Field(default_factory=list)  # empty: accept any
    max_associations: int = Field(default=10, ge=1)  # per listener process
    listener_processes: int = Field(default=1, ge=1)  # processes sharing the port (SO_REUSEPORT)
    # "auto": the lean transport on the pynetdicom release it was written for, else pynetdicom's server
    listener_server: Literal["auto", "lean", "stock"] = "auto"
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=30.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)

    # Storage
    data_dir: Path = PROJECT_ROOT / "var"
    spool_dir: Path | None = None  # default: <data_dir>/spool
    outbox_dir: Path | None = None  # default: <data_dir>/outbox

    # Queue and study index
    redis_url: str = "redis://127.0.0.1:6379/0"
    quiet_period: float = Field(default=10.0, ge=0)
    monitor_interval: float = Field(default=0.5, gt=0)
    visibility_timeout: float | None = Field(default=None, gt=0)  # default: from the time limits

    # Analysis
    model_dirs: list[Path] = Field(default_factory=list)  # default: models/packages
    device: str | None = None  # torch device for the models ("cpu", "cuda"); None: each package's
    write_not_performed_sr: bool = True
    # Packages trained on synthetic data only report on studies only where the site allows it
    report_synthetic_models: bool = False
    # DICOMweb base URL `discus results` reads delivered objects from; default: the first
    # dicomweb destination's url
    results_url: str | None = None
    # Packages validated on patients whose figures miss their declared targets: withheld unless allowed
    report_below_target_models: bool = False
    # Analysis options (worker.analysis.AnalysisOptions); None keeps that class's default
    heatmap_min_severity: int | None = Field(default=None, ge=0, le=3)  # Grad-CAM from this grade index
    slice_tolerance_mm: float | None = Field(default=None, gt=0)  # crop centre to source image, at most
    low_confidence: float | None = Field(default=None, ge=0, le=1)  # level points below it are warned of
    max_batch: int | None = Field(default=None, ge=1)  # crops per forward pass
    graded_levels: list[str] | None = None  # disc levels graded, e.g. ["L3-L4", "L4-L5", "L5-S1"]
    attempt_cap: int = Field(default=3, ge=1)
    analyze_soft_time_limit: float = Field(default=600.0, gt=0)
    analyze_time_limit: float = Field(default=660.0, gt=0)
    export_soft_time_limit: float = Field(default=120.0, gt=0)
    export_time_limit: float = Field(default=150.0, gt=0)

    # Export
    destinations: list[Destination] = Field(default_factory=list)
    export_deadline: float = Field(default=3600.0, gt=0)  # seconds from first try to dead letter
    export_backoff_base: float = Field(default=2.0, gt=0)
    export_backoff_max: float = Field(default=300.0, gt=0)
    retention_period: float = Field(default=7 * 24 * 3600.0, ge=0)  # keep spooled input after export
    sweep_interval: float = Field(default=60.0, gt=0)

    # Dashboard
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_address: str = "127.0.0.1"
    flower_user: str = "admin"
    flower_password: str = "discus"

    @field_validator("ae_title")
    @classmethod
    def _strip_aet(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("ae_title: must not be blank")
        return v

    @field_validator("data_dir", "spool_dir", "outbox_dir")
    @classmethod
    def _under_root(cls, v: Path | None) -> Path | None:
        # Relative paths mean "under the project root", whatever the current directory.
        return None if v is None else (v if v.is_absolute() else PROJECT_ROOT / v)

    @field_validator("model_dirs")
    @classmethod
    def _dirs_under_root(cls, v: list[Path]) -> list[Path]:
        return [p if p.is_absolute() else PROJECT_ROOT / p for p in v]

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destinations: names must be unique, got {names}")
        if self.analyze_time_limit <= self.analyze_soft_time_limit:
            raise ValueError("analyze_time_limit: must exceed analyze_soft_time_limit")
        if self.export_time_limit <= self.export_soft_time_limit:
            raise ValueError("export_time_limit: must exceed export_soft_time_limit")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path and Path(path).suffix == ".env":  # KEY=value lines, DISCUS_ prefix as in env
            sources.append(DotEnvSettingsSource(settings_cls, env_file=Path(path)))
        elif path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> Settings:
        """Read the settings, from the TOML file ``path`` if given, else from ``$DISCUS_CONFIG``.

        Raises
        ------
        FileNotFoundError
            ``path`` (or ``$DISCUS_CONFIG``) names a file that does not exist.
        """
        path = path if path is not None else os.environ.get(CONFIG_ENV)
        if path is None:
            return cls(**overrides)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: configuration file {path} does not exist")
        saved = os.environ.get(CONFIG_ENV)
        os.environ[CONFIG_ENV] = str(path)
        try:
            return cls(**overrides)
        finally:
            if saved is None:
                del os.environ[CONFIG_ENV]
            else:
                os.environ[CONFIG_ENV] = saved

    @property
    def spool(self) -> Path:
        """Folder the listener writes received instances to: ``<spool>/<study>/<series>/<sop>.dcm``."""
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def outbox(self) -> Path:
        """Folder the analysis writes its SR/SC objects to: ``<outbox>/<study>/<revision>/``."""
        return self.outbox_dir if self.outbox_dir is not None else self.data_dir / "outbox"

    @property
    def broker_visibility_timeout(self) -> float:
        """Seconds before an unacknowledged task (its worker died) is delivered again.

        Longer than any task can run or wait for its retry, so a live task is never doubled.
        """
        if self.visibility_timeout is not None:
            return self.visibility_timeout
        return max(self.analyze_time_limit, self.export_time_limit + self.export_backoff_max) + 60.0

    def destination(self, name: str) -> Destination:
        """The destination called ``name``.

        Raises
        ------
        KeyError
            No destination has that name.
        """
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(f"name: no destination {name!r}; known: {[d.name for d in self.destinations]}")
