"""``mmcore demo`` with every tool it is compared with: ``python -m benchmarks.demo``
(what ``bash scripts/demo.sh`` runs). The same steps, runs and table as
``mmcore demo`` (mmcore.demo), with safetensors, one file per model and one file
for the set, added as rows measured in the same rounds."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from mmcore import demo
from mmcore.errors import MMCoreError

from .methods import SafetensorsOneFile, SafetensorsPerModel


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__)
    p.add_argument("--cells", type=_positive, default=10_000, help="battery cells (models)")
    p.add_argument("--store", type=Path, default=Path("mmcore-demo.mm"),
                   help="store directory (default ./mmcore-demo.mm)")  # fmt: skip
    p.add_argument("--repeat", type=_positive, default=3, help="runs per timing (medians)")
    p.add_argument("--no-compare", action="store_true", help="mmcore's steps only")
    args = p.parse_args(argv)
    extra: list[type[demo.Method]] = [SafetensorsPerModel, SafetensorsOneFile]
    if importlib.util.find_spec("safetensors") is None:
        print("safetensors is not installed (bash scripts/setup.sh bench): its rows are left out",
              file=sys.stderr)  # fmt: skip
        extra = []
    try:
        return demo.run(args.cells, args.store, compare=not args.no_compare, repeat=args.repeat,
                        extra=extra)  # fmt: skip
    except MMCoreError as exc:
        print(f"mmcore: error: {exc}", file=sys.stderr)
        return 1
