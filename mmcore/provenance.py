"""Provenance: how to re-create a set's parameters instead of the parameters.

A *trainer* is a function of the running process, registered by name with
:func:`trainer`; its code is hashed when it is registered. A :class:`Recipe`
names a trainer, a dataset stored in the store, JSON-representable parameters,
a seed and optionally the models to retrain. Nothing stored is ever executed: a
recipe read back from a store is only a name, looked up in this process's
registry (docs/ARCHITECTURE.md, "Never pickle, never exec").

>>> @mmcore.trainer("battery.sgd")                      # doctest: +SKIP
... def sgd(models, data, *, lr, epochs, seed): ...
>>> recipe = mmcore.Recipe("battery.sgd", data=ds, params={"lr": 1e-3, "epochs": 2}, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import marshal
import os
import platform
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .errors import InvalidArgumentError, ProvenanceError, TrainerNotFoundError
from .recipe import Recipe as Recipe  # re-exported: mmcore.provenance.Recipe stays

if TYPE_CHECKING:
    from .stacked import StackedSet

StateDicts = dict[str, dict[str, torch.Tensor]]
Data = Mapping[str, Mapping[str, torch.Tensor]]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Trainer:
    """A registered training function and the hash of its code at registration."""

    name: str
    fn: Callable[..., Mapping[str, Any]]
    code_hash: str  # hex BLAKE3 of the function's source (its bytecode where there is no source)
    stacked: bool = False  # takes and returns stacks (mmcore.stacked.Stack), not state dicts


_REGISTRY: dict[str, Trainer] = {}


def code_hash(fn: Callable[..., Any]) -> str:
    """BLAKE3 of a function's qualified name and source text (dedented), or of its
    bytecode where Python has no source for it. Only the function itself is
    covered: a helper it calls can change without changing this hash."""
    from .kernels import blake3_bytes

    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        body = textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            raise InvalidArgumentError(
                f"cannot hash the code of {name}: register a Python function"
            ) from None
        body = marshal.dumps(code)
    return blake3_bytes(b"mmcore-trainer-v1\0" + name.encode() + b"\0" + body).hex()


def trainer(name: str, *, stacked: bool = False) -> Callable[[F], F]:
    """Registers ``fn(models, data, *, seed, **params) -> models`` under ``name``.

    ``models``: {name: state dict} of the models to retrain; ``data``: {name:
    {tensor name: tensor}} for the same models; the result: {name: state dict}
    for exactly those models, same tensor names, dtypes and shapes.

    With ``stacked=True`` the trainer works on stacks instead, as thousands of small
    models train best: ``models`` is an ``mmcore.stacked.Stack`` (names and
    {tensor name: [N, ...] tensor}) of one architecture, ``data`` the Stack of their
    data rows in the same order, and it returns {tensor name: [N, ...] tensor}; it is
    called once per architecture and must not modify its inputs in place.
    Registering a name again replaces the earlier function (re-running a notebook cell).
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a trainer name must be a non-empty string, got {name!r}")
    if not isinstance(stacked, bool):
        raise InvalidArgumentError(f"stacked must be True or False, got {stacked!r}")

    def register(fn: F) -> F:
        if not callable(fn):
            raise InvalidArgumentError(f"trainer {name!r}: {fn!r} is not callable")
        _REGISTRY[name] = Trainer(name, fn, code_hash(fn), stacked)
        return fn

    return register


def registered(name: str) -> Trainer:
    """The trainer registered under ``name`` in this process."""
    found = _REGISTRY.get(name)
    if found is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise TrainerNotFoundError(
            f"no trainer {name!r} is registered in this process (registered: {known}); "
            "import the module that defines it (its @mmcore.trainer registers it) first"
        )
    return found


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What can make a retraining differ: library versions, the device kind and
    name, and the determinism settings in force."""
    from . import __version__

    dev = device or torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": dev.type,
        "device_name": name,
        "deterministic": True,  # retraining always runs under use_deterministic_algorithms
        "python": platform.python_version(),
        "mmcore": __version__,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]  # fmt: skip


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms`` without its first-call import of
    torch._dynamo and torch._inductor (~2 s); the public call where the setter moved."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic torch for one call; every setting restored after."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:  # deterministic cuBLAS needs it (read when cuBLAS starts)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    try:
        _set_deterministic(True, warn_only=False)
        torch.manual_seed(seed)
        yield
    finally:
        _set_deterministic(was, warn_only=warn_only)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def run(found: Trainer, recipe: Recipe, models: StateDicts, data: Data) -> StateDicts:
    """Calls the trainer on ``models`` (the ones the recipe retrains) with their data,
    seeded and deterministic; checks that it returned those models, same tensors."""
    missing = [n for n in models if n not in data]
    if missing:
        raise ProvenanceError(
            f"the dataset has no data for {len(missing)} model(s) to retrain, e.g. {missing[0]!r}"
        )
    with deterministic(recipe.seed):
        got = found.fn(
            dict(models), {n: data[n] for n in models}, seed=recipe.seed, **recipe.params
        )
    if not isinstance(got, Mapping) or set(got) != set(models):
        raise ProvenanceError(
            f"trainer {found.name!r} must return a state dict for exactly the {len(models)} "
            "model(s) it was given"
        )
    out: StateDicts = {}
    for name, before in models.items():
        after = got[name]
        if not isinstance(after, Mapping) or set(after) != set(before):
            raise ProvenanceError(
                f"trainer {found.name!r}: model {name!r} came back with other tensor names"
            )
        after = {key: after[key] for key in before}  # matched by name, in the order given
        for key, t in after.items():
            old = before[key]
            if not isinstance(t, torch.Tensor) or t.dtype != old.dtype or t.shape != old.shape:
                raise ProvenanceError(
                    f"trainer {found.name!r}: model {name!r}, tensor {key!r} came back with "
                    "another type, dtype or shape"
                )
        out[name] = dict(after)
    return out


def run_stacked(found: Trainer, recipe: Recipe, models: StackedSet, data: StackedSet) -> StackedSet:
    """Calls a stacked trainer once per architecture group of ``models`` with the data
    rows of the same models (seeded, deterministic); checks what it returned."""
    from .stacked import Stack, StackedSet

    where = {
        name: (gi, row) for gi, g in enumerate(data.groups) for row, name in enumerate(g.names)
    }
    out = []
    for group in models.groups:
        found_in = {where[n][0] for n in group.names if n in where}
        missing = [n for n in group.names if n not in where]
        if missing:
            raise ProvenanceError(
                f"the dataset has no data for {len(missing)} model(s) to retrain, e.g. {missing[0]!r}"
            )
        if len(found_in) != 1:
            raise ProvenanceError(
                f"trainer {found.name!r} is stacked: the data of models of one architecture must "
                "have one shape (its entries' tensors differ in shape)"
            )
        rows = data.groups[found_in.pop()].select(group.names)
        with deterministic(recipe.seed):
            got = found.fn(group, rows, seed=recipe.seed, **recipe.params)
        if not isinstance(got, Mapping) or set(got) != set(group.params):
            raise ProvenanceError(
                f"trainer {found.name!r} must return {{tensor name: [models, ...] tensor}} with "
                f"the tensor names it was given ({list(group.params)[:3]}...)"
            )
        got = {key: got[key] for key in group.params}  # matched by name, in the order given
        for key, t in got.items():
            old = group.params[key]
            if not isinstance(t, torch.Tensor) or t.dtype != old.dtype or t.shape != old.shape:
                raise ProvenanceError(
                    f"trainer {found.name!r}: stacked tensor {key!r} came back with another "
                    "type, dtype or shape"
                )
        # the bits the values have: lazy conjugation or negation resolved (hashes read memory)
        out.append(Stack(group.names, {k: t.resolve_conj().resolve_neg() for k, t in got.items()}))
    return StackedSet(out)
