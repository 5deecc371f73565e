"""mmcore: save and recover whole sets of related deep-learning models.

>>> import mmcore
>>> with mmcore.open("fleet.mm") as store:          # doctest: +SKIP
...     v1 = store.save(models, approach="baseline", ref="fleet")
...     sets = store.load(v1)
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # torch's CPU wheel warns, in two lines on stderr, when numpy is absent; mmcore never
    # needs numpy, so importing torch through mmcore stays quiet about it
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from . import errors
from ._native import cuda_available
from .api import ModelStore, open
from .provenance import trainer
from .recipe import Recipe
from .versions import VersionInfo

__version__ = "0.1.0"

__all__ = [
    "ModelStore",
    "Recipe",
    "VersionInfo",
    "__version__",
    "cuda_available",
    "errors",
    "open",
    "trainer",
]
