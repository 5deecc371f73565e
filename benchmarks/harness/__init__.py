"""The benchmarks' code (the repository's, not the wheel's: mmcore never imports it).

runner.py is the harness of ``python -m benchmarks.run`` (configurations; the battery,
image and scale parts), contenders.py and methods.py what it measures, report.py its
tables and plots; battery.py, stacked.py and updates.py the focused benchmarks of
``benchmarks/*.py``; demo.py the demo with every tool (``python -m benchmarks.demo``).
"""
