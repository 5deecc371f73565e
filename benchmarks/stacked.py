"""Sets as stacks on the battery use case; see ``python -m benchmarks.stacked --help``."""

from mmcore.bench.stacked import main

if __name__ == "__main__":
    raise SystemExit(main())
