"""A provenance recipe as plain data: what a provenance version records about how its
models are re-created (docs/FORMAT.md, "Provenance versions"). The format layer reads
it from manifests; ``mmcore.provenance`` runs it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgumentError


def _check_json(value: Any, where: str) -> None:
    """JSON-representable: str keys, finite numbers, lists, no other types."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise InvalidArgumentError(
        f"{where}: a {type(value).__name__} is not JSON-representable "
        "(use numbers, strings, booleans, None, lists and maps)"
    )


@dataclass(frozen=True)
class Recipe:
    """How a provenance version's models are re-created from its parent's.

    ``trainer``: a registered trainer's name; ``data``: a dataset id from
    ``store.put_dataset``; ``params``: keyword arguments of the trainer
    (JSON-representable); ``seed``: passed to the trainer, and seeds torch
    before the call; ``models``: the models to retrain (None: every model of
    the parent); the others are the parent's, unchanged.
    """

    trainer: str
    data: str
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    models: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trainer, str) or not self.trainer:
            raise InvalidArgumentError(
                f"Recipe.trainer must be a trainer name, got {self.trainer!r}"
            )
        if not isinstance(self.data, str) or not self.data:
            raise InvalidArgumentError(
                f"Recipe.data must be a dataset id (from store.put_dataset), got {self.data!r}"
            )
        if not isinstance(self.params, Mapping):
            raise InvalidArgumentError(
                f"Recipe.params must be a mapping, got {type(self.params).__name__}"
            )
        _check_json(dict(self.params), "Recipe.params")
        reserved = {"seed"} & set(self.params)
        if reserved:
            raise InvalidArgumentError("Recipe.params must not hold 'seed': pass seed= instead")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise InvalidArgumentError(
                f"Recipe.seed must be an int in [0, 2**63), got {self.seed!r}"
            )
        if self.models is not None:
            if isinstance(self.models, str) or not all(
                isinstance(m, str) and m for m in self.models
            ):
                raise InvalidArgumentError("Recipe.models must be None or a list of model names")
            if len(set(self.models)) != len(self.models):
                raise InvalidArgumentError("Recipe.models names a model twice")
            if not self.models:
                raise InvalidArgumentError(
                    "Recipe.models is empty: pass None to retrain every model"
                )
        object.__setattr__(self, "params", json.loads(json.dumps(dict(self.params))))
        if self.models is not None:
            object.__setattr__(self, "models", list(self.models))

    def encode(self) -> dict[str, Any]:
        return {"trainer": self.trainer, "data": self.data, "params": dict(self.params),
                "seed": self.seed, "models": None if self.models is None else list(self.models)}  # fmt: skip
