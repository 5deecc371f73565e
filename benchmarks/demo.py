"""``mmcore demo`` compared with every tool: ``python -m benchmarks.demo --help``."""

import sys
from pathlib import Path

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

from benchmarks.harness.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
