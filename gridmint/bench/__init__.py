"""Benchmarks: ``gridmint bench NAME [options]``.

Each benchmark is a module ``gridmint.bench.<name>`` with ``main(argv: list[str]) -> int``. It prints what it
does as it goes, and its LAST line of output is one JSON object of figures (ratios against a baseline measured
in the same run, since machines are noisy).
"""
from __future__ import annotations

import importlib
import pkgutil

from protocol.errors import GridMintValueError


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run(name: str, argv: list[str]) -> int:
    if name not in available():
        raise GridMintValueError(f"no benchmark {name!r}; available: {', '.join(available()) or 'none'}")
    module = importlib.import_module(f"gridmint.bench.{name}")
    return int(module.main(argv) or 0)
