"""The benchmark harness in one command (issue 10): from the repository root,

    .venv/bin/python -m benchmarks.run --quick     # minutes on 2 cores
    .venv/bin/python -m benchmarks.run             # the full run

writes benchmarks/results/*.json and *.png and regenerates the harness section
of benchmarks/RESULTS.md. ``--help`` lists the options; the code is
benchmarks/harness/ (runner.py), in the repository only: the wheel holds the library.
"""

from pathlib import Path

from benchmarks.harness.runner import main

if __name__ == "__main__":
    raise SystemExit(main(repo=Path(__file__).resolve().parent.parent))
