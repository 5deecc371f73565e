"""Benchmarks of mmcore; ``python -m benchmarks.run`` is the harness (see run.py).

Run from the repository root, ``python -m`` puts the root first on sys.path,
where the source tree's ``mmcore/`` (without its built native module) would
shadow the installed package. Where the source tree holds no built module, the
root is dropped from sys.path here, before anything imports mmcore. The entry
points run as files (``python benchmarks/battery.py``) put the root first and
import this package before anything else, so they find the same mmcore.
The benchmarks' code is ``benchmarks/harness/``; the wheel holds only the library.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if not any((_ROOT / "mmcore").glob("_core*.so")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
