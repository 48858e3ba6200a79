"""Settings: defaults, TOML file, environment precedence, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import PROJECT_ROOT, Settings


def test_defaults_are_the_standard_ports_and_var_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCUS_CONFIG", raising=False)
    s = Settings()
    assert (s.port, s.flower_port, s.ae_title) == (11112, 5555, "DISCUS")
    assert s.redis_url.endswith(":6379/0")
    assert s.spool == PROJECT_ROOT / "var" / "spool"
    assert s.outbox == PROJECT_ROOT / "var" / "outbox"
    assert s.broker_visibility_timeout > s.analyze_time_limit


def test_toml_file_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text('port = 12000\nquiet_period = 2.5\ndata_dir = "/srv/discus"\n'
                   '[[destinations]]\nname = "pacs"\nport = 104\nae_title = "PACS"\n')
    monkeypatch.setenv("DISCUS_QUIET_PERIOD", "7")
    s = Settings.load(cfg)
    assert s.port == 12000 and s.quiet_period == 7.0
    assert s.spool == Path("/srv/discus/spool")
    assert s.destination("pacs").port == 104
    with pytest.raises(KeyError, match="pacs"):
        s.destination("nope")
    assert Settings.load(cfg, port=13000).port == 13000


def test_example_configuration_documents_every_key() -> None:
    example = PROJECT_ROOT / "deploy" / "discus.example.toml"
    text = example.read_text()
    for key in Settings.model_fields:
        assert f"{key} =" in text or f"[[{key}]]" in text, f"{key} is not in {example.name}"
    s = Settings.load(example)
    assert s.destinations[0].ae_title == "ORTHANC"


@pytest.mark.parametrize("bad", [
    {"port": 0}, {"ae_title": "X" * 17}, {"quiet_period": -1},
    {"analyze_soft_time_limit": 10, "analyze_time_limit": 5},
    {"destinations": [{"name": "a"}, {"name": "a"}]},
    {"destinations": [{"name": "w", "kind": "dicomweb"}]},
    {"no_such_key": 1},
])
def test_invalid_values_are_refused(bad: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCUS_CONFIG", raising=False)
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path"):
        Settings.load(tmp_path / "absent.toml")


def test_env_file_is_read_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCUS_PORT", raising=False)
    cfg = tmp_path / "discus.env"
    cfg.write_text('DISCUS_PORT=12345\nDISCUS_DESTINATIONS=[{"name": "p", "port": 104}]\n')
    s = Settings.load(cfg)
    assert s.port == 12345 and s.destination("p").port == 104


def test_analysis_options_come_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.analysis import AnalysisOptions

    monkeypatch.delenv("DISCUS_CONFIG", raising=False)
    assert AnalysisOptions.from_settings(Settings()) == AnalysisOptions()  # unset keeps the defaults
    cfg = tmp_path / "a.toml"
    cfg.write_text('heatmap_min_severity = 2\ngraded_levels = ["L4-L5", "L5-S1"]\n')
    monkeypatch.setenv("DISCUS_MAX_BATCH", "4")
    opts = AnalysisOptions.from_settings(Settings.load(cfg))
    assert (opts.heatmap_min_severity, opts.max_batch, opts.graded_levels) == (2, 4, ("L4-L5", "L5-S1"))
    with pytest.raises(ValidationError):
        Settings(heatmap_min_severity=4)
    with pytest.raises(ValueError, match="graded_levels"):
        AnalysisOptions.from_settings(Settings(graded_levels=["L9-L10"]))
