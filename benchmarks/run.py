"""The benchmark harness in one command (issue 10): from the repository root,

    .venv/bin/python -m benchmarks.run --quick     # minutes on 2 cores
    .venv/bin/python -m benchmarks.run             # the full run

writes benchmarks/results/*.json and *.png and regenerates the harness section
of benchmarks/RESULTS.md. ``--help`` lists the options; the code is
mmcore.bench.harness (installed with the package).
"""

from pathlib import Path

from mmcore.bench.harness import main

if __name__ == "__main__":
    raise SystemExit(main(repo=Path(__file__).resolve().parent.parent))
