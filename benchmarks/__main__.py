"""`python -m benchmarks`: run every benchmark and print markdown tables for the README."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path


def main() -> None:
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if module.name.startswith("bench_"):
            print(importlib.import_module(f"benchmarks.{module.name}").main(), "\n", flush=True)


if __name__ == "__main__":
    main()
