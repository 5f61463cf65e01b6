"""The one CLI entry point: ``gridmint <role> ...``."""
from __future__ import annotations


def main() -> None:
    raise SystemExit("gridmint: CLI under construction")
