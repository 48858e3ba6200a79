"""Model cards: what a model is, what it was trained and measured on, and what it is not for."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from models.config import ModelConfig

SYNTHETIC_WARNING = (
    "Trained on synthetic phantom data only. Not for clinical use. The held-out metrics below were "
    "measured on freshly generated synthetic studies (seeds never used in training); they say nothing "
    "about performance on patient images."
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _metrics_table(m: dict[str, Any]) -> list[str]:
    names = m.get("class_names", list(m.get("per_class", {})))
    lines = ["| class | precision | recall | F1 | AUC | support |", "|---|---|---|---|---|---|"]
    for c in names:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | {_fmt(pc['f1'])} | "
                     f"{_fmt(pc['auc'])} | {pc['support']} |")
    lines.append(f"| macro | {_fmt(m['macro_precision'])} | {_fmt(m['macro_recall'])} | {_fmt(m['macro_f1'])} | "
                 f"{_fmt(m['macro_auc'])} | {m['n']} |")
    lines.append(f"| weighted | {_fmt(m['weighted_precision'])} | {_fmt(m['weighted_recall'])} | "
                 f"{_fmt(m['weighted_f1'])} | | |")
    lines.append("")
    lines.append(f"Accuracy {_fmt(m['accuracy'])}" + (
        f"; RSNA sample-weighted log loss (1, 2, 4) {_fmt(m['rsna_weighted_log_loss'])}"
        if "rsna_weighted_log_loss" in m else "") + f"; log loss {_fmt(m['log_loss'])}.")
    lines.append("")
    lines.append("Confusion matrix (rows true, columns predicted; order " + ", ".join(names) + "): "
                 + json.dumps(m["confusion_matrix"]))
    return lines


def card_data(config: ModelConfig, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON model card: the config's provenance plus warnings and evaluation details."""
    synthetic = bool(config.training.get("synthetic"))
    return {
        "name": config.name, "task": config.task, "architecture": config.architecture, "version": config.version,
        "class_names": config.class_names, "input_size": list(config.input_size),
        "model_kwargs": config.model_kwargs, "preprocessing": config.preprocessing,
        "training": config.training, "metrics": config.metrics, "sha256": config.sha256,
        "intended_use": "research and demonstration of the Discus worker" if synthetic else
        "decision support research; validate locally before any clinical use",
        "warnings": [SYNTHETIC_WARNING] if synthetic else ["Not validated for clinical use."],
        "evaluation": evaluation or {},
        "provenance": (config.provenance_record.one_line() if config.provenance_record else
                       "[NO PROVENANCE] the package declares no training data or validation"),
    }


def render_markdown(card: dict[str, Any]) -> str:
    """Markdown text of a card made by :func:`card_data`."""
    t = card["training"]
    lines = [f"# {card['name']} {card['version']}", ""]
    if card.get("provenance"):
        lines += [f"**Provenance:** {card['provenance']}", ""]
    for w in card["warnings"]:
        lines += [f"**{w}**", ""]
    lines += [
        f"- Task: `{card['task']}` ({t.get('task_description', '')})",
        f"- Classes (output order): {', '.join(card['class_names'])}",
        f"- Architecture: `{card['architecture']}` {json.dumps(card['model_kwargs'])}",
    ]
    if t.get("architecture_note"):
        lines.append(f"- Note: {t['architecture_note']}")
    lines += [
        f"- Input: {card['input_size'][0]} x {card['input_size'][1]} px, 1 channel; preprocessing "
        f"{json.dumps(card['preprocessing'])}",
        f"- Weights SHA-256: `{card['sha256']}`",
        f"- Intended use: {card['intended_use']}",
        "",
        "## Training",
        "",
        f"- Data: {json.dumps(t.get('data', {}))}",
        f"- Strategy: {t.get('strategy')}; {t.get('folds')} fold(s) stratified by label, grouped by patient "
        f"(exported: fold {t.get('exported_fold')}, lowest validation loss); "
        f"seed {t.get('seed')}; up to {t.get('epochs')} epochs (best epoch per fold: {t.get('best_epochs')})",
        *([f"- Started from: {t['init']}"] if t.get("init") else []),
        f"- Optimiser: Adam lr {t.get('lr')}, ReduceLROnPlateau, early stopping, class weighting "
        f"{t.get('class_weighting')}; augmentation {t.get('augmentation')}",
        f"- Training time: {t.get('train_seconds', 'n/a')} s on {t.get('device', 'n/a')}",
        "",
        "## Cross-validation (mean ± sd over folds)" if t.get("folds", 1) > 1 else
        "## Validation (one 80:20 split grouped by patient, no cross-validation)",
        "",
    ]
    for k, v in t.get("cv_summary", {}).items():
        lines.append(f"- {k}: {v['mean']:.3f} ± {v['sd']:.3f}" if t.get("folds", 1) > 1 else f"- {k}: {v['mean']:.3f}")
    held = card.get("evaluation", {}).get("holdout")
    lines += ["", "## Held-out evaluation", ""]
    if held:
        lines.append(f"Data: {json.dumps(card['evaluation'].get('holdout_data', {}))}")
        lines.append("")
        lines += _metrics_table(held)
    else:
        lines.append("No separate held-out set; the metrics in config.json are the cross-validation means.")
    placement = card.get("evaluation", {}).get("heatmap_placement")
    if placement:
        lines += ["", "## Heatmap placement", "", placement["text"]]
    plots = card.get("evaluation", {}).get("plots", [])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Limitations", "",
              "- Heatmaps (Grad-CAM) show where the network looked, not a lesion outline; review them.",
              "- Performance on data unlike the training data (scanner, protocol, population) is unknown."]
    return "\n".join(lines) + "\n"


def write_card(directory: str | Path, config: ModelConfig, evaluation: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``MODEL_CARD.md`` and ``model_card.json`` into a package directory."""
    out = Path(directory)
    card = card_data(config, evaluation)
    js = out / "model_card.json"
    js.write_text(json.dumps(card, indent=2, sort_keys=True, default=_default) + "\n", encoding="utf-8")
    md = out / "MODEL_CARD.md"
    md.write_text(render_markdown(card), encoding="utf-8")
    return md, js


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def replace_card_section(directory: str | Path, heading: str, body: str) -> Path:
    """Put ``heading`` and ``body`` at the end of a package's ``MODEL_CARD.md``, replacing an earlier one."""
    card = Path(directory) / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    text = re.sub(rf"\n{re.escape(heading)}\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n"
    card.write_text(f"{text}\n{heading}\n\n{body.rstrip()}\n", encoding="utf-8")
    return card


def refresh_card(directory: str | Path) -> Path:
    """Rewrite ``MODEL_CARD.md`` from the package's ``model_card.json`` (after a wording change)."""
    out = Path(directory)
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    md = out / "MODEL_CARD.md"
    md.write_text(render_markdown(card), encoding="utf-8")
    return md
