"""Run every benchmark script in this folder (``make bench``); each prints its own figures."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name == "run_all" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tests.bench.{info.name}")
        if hasattr(module, "main"):
            print(f"### {info.name}", flush=True)
            takes_argv = bool(inspect.signature(module.main).parameters)
            module.main([]) if takes_argv else module.main()
        else:
            print(f"### {info.name}: no main(), skipped", file=sys.stderr)


if __name__ == "__main__":
    main()
