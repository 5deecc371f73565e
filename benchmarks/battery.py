"""Battery use case benchmark; see ``python benchmarks/battery.py --help``."""

from mmcore.bench.battery import main

if __name__ == "__main__":
    raise SystemExit(main())
