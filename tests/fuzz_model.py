"""The model side of test_fuzz_api.py: compact specs of model sets and of the edits
between versions (so that a failing sequence prints as a few tuples, not tensors),
the tensors they stand for, the comparisons a version's expected models need, and
fault injection into the commit protocol."""

from __future__ import annotations

import collections
import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hypothesis import strategies as st

from mmcore.errors import MMCoreError
from mmcore.examples import battery
from mmcore.kernels.delta import FLOAT_KINDS
from mmcore.paths.update import EXACT_SUFFIXES
from mmcore.store import packs, remote

Models = dict[str, dict[str, torch.Tensor]]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
# 0-d, empty (zero-element) and odd-sized; a few larger ones, so that zstd pays for a
# compressible delta (a shift, a few nudged elements) and a model blob is not raw
SHAPES = [(), (0,), (1,), (3,), (5,), (2, 3), (4, 0), (3, 1, 2), (7, 5), (64,)]
# names that differ only in case, start with ".", or hold dots; *running_var stays exact
KEYS = ["w", "W", ".w", "b", "mask", "0.weight", "bn.running_mean", "bn.running_var"]
NAMES = ["a", "A", ".a", "b.c", "Ab", "aB"]
CELLS = ["cell_0", "cell_1", "cell_2"]  # battery models: the provenance trainer's architecture
FILLS = ["randn", "zeros", "special", "bits"]
TOLERANCES = [None, None, 1e-4, 1e-3, 1e-2, 1e-1]
BATTERY_LAYOUT = [
    (k, torch.float32, torch.Size(s))
    for k, s in (
        ("0.weight", (48, 5)),
        ("0.bias", (48,)),
        ("2.weight", (48, 48)),
        ("2.bias", (48,)),
        ("4.weight", (48, 48)),
        ("4.bias", (48,)),
        ("6.weight", (1, 48)),
        ("6.bias", (1,)),
    )
]
BATTERY_KEYS = [k for k, _, _ in BATTERY_LAYOUT]

seeds = st.integers(0, 2**16)
tensor_spec = st.tuples(
    st.sampled_from(list(DTYPES)), st.sampled_from([*SHAPES, (64,)]), st.sampled_from(FILLS), seeds
)
any_model = st.lists(
    st.tuples(st.sampled_from(KEYS), tensor_spec), max_size=5, unique_by=lambda kt: kt[0]
)
# small tensors of mixed dtypes around a larger float one (whose lossy deltas compress)
small = st.tuples(
    st.sampled_from(list(DTYPES)),
    st.sampled_from([(), (1,), (3,), (5,), (2, 3)]),
    st.just("randn"),
    seeds,
)
mixed_model = st.tuples(
    st.lists(
        st.tuples(st.sampled_from(KEYS), small), min_size=2, max_size=3, unique_by=lambda kt: kt[0]
    ),
    st.tuples(
        st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
        st.sampled_from([(64,), (7, 5)]),
        st.just("randn"),
        seeds,
    ),
    st.integers(0, 3),
).map(lambda m: [*m[0][: m[2]], ("big", m[1]), *m[0][m[2] :]])
model_spec = st.one_of(any_model, mixed_model)
# (plain models, battery models, order seed): at least one model
set_spec = st.tuples(
    st.dictionaries(st.sampled_from(NAMES), model_spec, max_size=4),
    st.dictionaries(st.sampled_from(CELLS), seeds, max_size=2),
    seeds,
).filter(lambda s: bool(s[0] or s[1]))
idx = st.integers(0, 7)
scales = st.sampled_from([1e-5, 1e-3, 1e-1, 1.0])
# edits of one version into the next: (op, model index, ...) with indices taken modulo
value_edit = st.one_of(
    st.tuples(st.just("nudge"), idx, idx, scales, seeds),  # a few elements of a tensor
    st.tuples(st.just("shift"), idx, idx, scales),  # every element: compressible
    st.tuples(st.just("random"), idx, idx, seeds),  # fresh values, same dtype and shape
    st.tuples(st.just("nudge_all"), idx, scales, seeds),  # every tensor of a model
    st.tuples(st.just("random_small"), idx, seeds),  # fresh values in its tensors of < 16
)
structure_edit = st.one_of(
    st.tuples(st.just("reshape"), idx, idx, st.sampled_from(SHAPES), seeds),
    st.tuples(st.just("retype"), idx, idx, st.sampled_from(list(DTYPES)), seeds),
    st.tuples(st.just("add_key"), idx, st.sampled_from(KEYS), tensor_spec),
    st.tuples(st.just("drop_key"), idx, idx),
    st.tuples(st.just("reorder_keys"), idx, seeds),
    st.tuples(st.just("drop_model"), idx),
    st.tuples(st.just("add_model"), st.sampled_from(NAMES + CELLS), model_spec, seeds),
    st.tuples(st.just("reorder_models"), seeds),
)
# edits of one version into the next: (op, model index, ...) with indices taken modulo;
# mostly new values (deltas), sometimes new structure (models stored whole)
edit = st.one_of(value_edit, value_edit, structure_edit)
edits = st.lists(edit, min_size=1, max_size=4)


def make_tensor(dtype_name: str, shape: tuple[int, ...], fill: str, seed: int) -> torch.Tensor:
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if fill == "zeros" or n == 0:
        return torch.zeros(shape, dtype=dtype)
    if fill == "bits" and dtype != torch.bool:  # any bit pattern: NaN payloads, -0.0, ...
        raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
        return raw.view(dtype).reshape(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.complex64:
        return torch.randn(shape, generator=g, dtype=torch.complex64)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -300), min(info.max, 300) + 1, shape, generator=g).to(
            dtype
        )
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if fill == "special":
        flat = t.reshape(-1)
        special = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, 65504.0]
        for i in torch.randperm(n, generator=g)[: max(1, n // 3)].tolist():
            flat[i] = special[i % len(special)]
    return t.to(dtype)


def make_model(spec: Any) -> dict[str, torch.Tensor]:
    return {key: make_tensor(*ts) for key, ts in spec}


def make_cell(seed: int) -> dict[str, torch.Tensor]:
    return battery.make_cells(1, seed=seed)["cell_000000"]


def make_set(spec: tuple[Any, Any, int]) -> Models:
    plain, cells, order = spec
    models = {name: make_model(ms) for name, ms in plain.items()}
    models.update({name: make_cell(seed) for name, seed in cells.items()})
    names = list(models)
    random.Random(order).shuffle(names)
    return {n: models[n] for n in names}


def _pick(seq: list[Any], i: int) -> Any:
    return seq[i % len(seq)]


def _nudged(t: torch.Tensor, scale: float, seed: int, every: bool) -> torch.Tensor:
    out = t.clone()
    n = out.numel()
    if n == 0:
        return out
    g = torch.Generator().manual_seed(seed)
    flat = out.reshape(-1)
    at = torch.arange(n) if every else torch.randperm(n, generator=g)[: max(1, n // 4)]
    if out.dtype == torch.bool:
        flat[at] = ~flat[at]
    elif out.dtype.is_complex:
        flat[at] += scale * torch.randn(len(at), generator=g, dtype=out.dtype)
    elif not out.dtype.is_floating_point:
        flat[at] ^= 1
    else:
        noise = scale * torch.randn(len(at), generator=g, dtype=torch.float64)
        flat[at] = (flat[at].double() + noise).to(out.dtype)
    return out


def _shifted(t: torch.Tensor, scale: float) -> torch.Tensor:
    if t.dtype == torch.bool:
        return ~t
    if not (t.dtype.is_floating_point or t.dtype.is_complex):
        return t ^ 1
    return (t.double() + scale).to(t.dtype) if not t.dtype.is_complex else t + scale


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def apply_edits(models: Models, ops: list[tuple[Any, ...]]) -> Models:
    """The next version of ``models`` (left untouched): the edits in order. Never empty."""
    out = {n: dict(sd) for n, sd in models.items()}
    for op in ops:
        kind = op[0]
        if kind == "add_model":
            _, name, ms, seed = op
            out[name] = make_cell(seed) if name in CELLS else make_model(ms)
            continue
        if kind == "reorder_models":
            names = list(out)
            random.Random(op[1]).shuffle(names)
            out = {n: out[n] for n in names}
            continue
        if not out:
            continue
        name = _pick(list(out), op[1])
        sd = out[name]
        if kind == "drop_model":
            if len(out) > 1:
                del out[name]
        elif kind == "add_key":
            sd[op[2]] = make_tensor(*op[3])
        elif kind == "reorder_keys":
            keys = list(sd)
            random.Random(op[2]).shuffle(keys)
            out[name] = {k: sd[k] for k in keys}
        elif kind == "random_small":
            out[name] = {
                k: make_tensor(_name(t), tuple(t.shape), "randn", op[2] + i)
                if t.numel() < 16
                else t
                for i, (k, t) in enumerate(sd.items())
            }
        elif kind == "nudge_all":
            out[name] = {
                k: _nudged(t, op[2], op[3] + i, True) for i, (k, t) in enumerate(sd.items())
            }
        elif sd:
            key = _pick(list(sd), op[2])
            t = sd[key]
            dname = _name(t)
            if kind == "nudge":
                sd[key] = _nudged(t, op[3], op[4], False)
            elif kind == "shift":
                sd[key] = _shifted(t, op[3])
            elif kind == "random":
                sd[key] = make_tensor(dname, tuple(t.shape), "randn", op[3])
            elif kind == "reshape":
                sd[key] = make_tensor(dname, op[3], "randn", op[4])
            elif kind == "retype":
                sd[key] = make_tensor(op[3], tuple(t.shape), "randn", op[4])
            elif kind == "drop_key":
                del sd[key]
    return out


# -- comparisons -------------------------------------------------------------


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))


def assert_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(want), f"{what}: tensor names/order {list(got)} != {list(want)}"
    for key, t in want.items():
        g = got[key]
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), (
            f"{what}, {key!r}: {g.dtype}{tuple(g.shape)} != {t.dtype}{tuple(t.shape)}"
        )
        assert same_bits(g, t), f"{what}, {key!r}: other bits"


def assert_models(got: Models, want: Models, what: str) -> None:
    assert list(got) == list(want), f"{what}: models/order {list(got)} != {list(want)}"
    for name, sd in want.items():
        assert_model(got[name], sd, f"{what}, model {name!r}")


def lossy(dtype: torch.dtype, key: str) -> bool:
    return dtype in FLOAT_KINDS and not key.endswith(EXACT_SUFFIXES)


_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def assert_within(got: Models, want: Models, tol: float, what: str) -> None:
    """A lossy save's recovery: every float (but running statistics) within ``tol`` of
    what was saved, its non-finite values and zeros bit for bit; every other tensor exact."""
    assert list(got) == list(want), f"{what}: models/order {list(got)} != {list(want)}"
    for name, sd in want.items():
        g_sd = got[name]
        assert list(g_sd) == list(sd), f"{what}, model {name!r}: tensor names/order"
        for key, w in sd.items():
            g = g_sd[key]
            where = f"{what}, model {name!r}, {key!r}"
            assert (g.dtype, g.shape) == (w.dtype, w.shape), where
            if not lossy(w.dtype, key) or w.numel() == 0:
                assert same_bits(g, w), f"{where}: an exact tensor changed under a tolerance"
                continue
            gf, wf = g.reshape(-1), w.reshape(-1)
            special = ~torch.isfinite(wf) | (wf == 0)
            as_int = _INT_OF[w.element_size()]
            assert torch.equal(gf[special].view(as_int), wf[special].view(as_int)), (
                f"{where}: a non-finite value or a zero was not kept bit for bit"
            )
            err = (gf[~special].double() - wf[~special].double()).abs()
            worst = float(err.max()) if err.numel() else 0.0
            assert worst <= tol, f"{where}: error {worst} > tolerance {tol}"


def clone_models(models: Models) -> Models:
    return {n: {k: t.detach().clone() for k, t in sd.items()} for n, sd in models.items()}


def is_cell(sd: dict[str, torch.Tensor]) -> bool:
    """Of the battery trainer's architecture (tensor names in any order)."""
    return sorted((k, t.dtype, t.shape) for k, t in sd.items()) == sorted(BATTERY_LAYOUT)


def layout(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, torch.Size]]:
    return {k: (t.dtype, t.shape) for k, t in sd.items()}


def same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same tensors by name (key order aside), bit for bit."""
    return layout(a) == layout(b) and all(same_bits(a[k], b[k]) for k in a)


# -- fault injection ---------------------------------------------------------


class InjectedFault(OSError):
    """The error a crash point raises (an I/O error, as a failing disk gives)."""


# Where a fault is injected: (what, where, after the real call). The points after
# the catalog's commit leave the operation durable; every other one leaves nothing.
POINTS = {
    "write_ptr": ("writer", "write_ptr", False),
    "write_segments": ("writer", "write_segments", False),
    "finish": ("writer", "finish", False),
    "finish_after": ("writer", "finish", True),
    "create": ("tier", "create", False),
    "read_into": ("tier", "read_into", False),
    "map_range": ("tier", "map_range", False),
    "commit": ("catalog", "commit", False),
    "commit_after": ("catalog", "commit", True),
    "tier_delete": ("tier", "delete", False),
}
POST_COMMIT = {"commit_after", "tier_delete"}
crash_points = st.one_of(
    st.none(), st.none(), st.tuples(st.sampled_from(sorted(POINTS)), st.integers(1, 3))
)


def injected(exc: BaseException) -> None:
    """Re-raises ``exc`` unless an injected fault caused it (the library may wrap an I/O
    error in one of its own, naming the version)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InjectedFault):
            return
        wrapped = isinstance(seen, MMCoreError)  # a typed error raised while handling it
        seen = seen.__cause__ or (seen.__context__ if wrapped else None)
    raise exc


class Fired:
    point: str | None = None


FIRED: collections.Counter[str] = collections.Counter()  # faults injected, by point


@contextlib.contextmanager
def inject(store: Any, crash: tuple[str, int] | None) -> Iterator[Fired]:
    """Raises InjectedFault at the k-th call of the crash point while the block runs."""
    fired = Fired()
    if crash is None:
        yield fired
        return
    point, k = crash
    what, attr, after = POINTS[point]
    calls = [0]

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] != k:
                return real(*args, **kwargs)
            fired.point = point
            FIRED[point] += 1
            if after:
                real(*args, **kwargs)
            raise InjectedFault(5, f"injected fault at {point} (call {k})")

        return faulty

    if what == "writer":  # every pack writer the operation creates
        cls: Any = remote._ObjectPackWriter if store.remote else packs._LocalPackWriter
        real = cls.__dict__[attr]
        setattr(cls, attr, wrap(real))
        try:
            yield fired
        finally:
            setattr(cls, attr, real)
        return
    obj = store.tier if what == "tier" else store.catalog
    setattr(obj, attr, wrap(getattr(obj, attr)))
    try:
        yield fired
    finally:
        delattr(obj, attr)
