"""Model sets as stacked tensors: one ``[N, ...]`` tensor per tensor name for the N
models of one architecture, run together in one batched call.

A group's models are stored model after model with one stride, so each of its
tensors *is* a strided ``[N, ...]`` view of the group's records: ``load_stacked``
returns those views (no copy on the CPU, one copy to a device), ``Stack.forward``
runs all N models with ``torch.func.functional_call`` under ``torch.vmap``, and
``save_stacked`` writes stacks through the save paths without unstacking them.

>>> import torch, mmcore
>>> from mmcore.stacked import Stack
>>> net = torch.nn.Linear(3, 2)
>>> stack = Stack(["a", "b"], {"weight": torch.zeros(2, 2, 3), "bias": torch.ones(2, 2)})
>>> stack.forward(net.to("meta"), torch.ones(2, 4, 3)).shape
torch.Size([2, 4, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ._gc import gc_paused
from .errors import InvalidArgumentError, InvalidModelSetError
from .modelset import Schema, module_state

StateDict = dict[str, torch.Tensor]


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a column that is one tensor expanded (a tensor every model
    shares) moves as that one tensor, expanded again there."""
    if t.dim() and t.shape[0] > 1 and t.stride(0) == 0:
        return t[0].to(device).expand(t.shape)
    return t.to(device)


class Stack:
    """The models of one architecture, stacked: ``names`` (N model names) and
    ``params`` ({tensor name: [N, ...] tensor}, every tensor of the state dict,
    buffers included, in state-dict order). Row i of every tensor is model i's."""

    def __init__(self, names: Sequence[str], params: Mapping[str, torch.Tensor], *,
                 records: tuple[torch.Tensor, Schema] | None = None) -> None:  # fmt: skip
        self.names = tuple(names)
        self.params = dict(params)
        for key, t in self.params.items():
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != len(self.names):
                lead = (
                    type(t).__name__
                    if not isinstance(t, torch.Tensor)
                    else "no leading dimension"
                    if t.dim() == 0
                    else f"leading dimension {t.shape[0]}"
                )
                raise InvalidModelSetError(
                    f"stacked tensor {key!r} has {lead}, but the stack has {len(self.names)} "
                    "models: every tensor of a stack is [models, ...]"
                )
        # the buffer the params view (count x stride bytes) and its layout, when they do
        self._records = records

    @classmethod
    def from_state_dicts(cls, models: Mapping[str, Mapping[str, torch.Tensor]]) -> Stack:
        """Stacks state dicts of ONE architecture (one copy per tensor name); models
        of another architecture are refused, naming the first that differs."""
        if not isinstance(models, Mapping) or not models:
            raise InvalidModelSetError("from_state_dicts needs a non-empty {name: state dict}")
        names = list(models)
        first = models[names[0]]
        want = [(k, t.dtype, t.shape) for k, t in first.items()]
        for name in names[1:]:
            got = [(k, t.dtype, t.shape) for k, t in models[name].items()]
            if got != want:
                raise InvalidModelSetError(
                    f"model {name!r} has another architecture (tensor names, dtypes or shapes) "
                    f"than {names[0]!r}: a stack holds models of one architecture; "
                    "mmcore.stacked.stack_sets groups a mixed set"
                )
        return cls(names, {k: torch.stack([models[n][k] for n in names]) for k in first})

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Stack({len(self.names)} models, {len(self.params)} tensors, device={self.device})"

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device if self.params else torch.device("cpu")

    def state_dicts(self) -> dict[str, StateDict]:
        """{name: state dict} whose tensors are views of the stacked tensors (no copy)."""
        keys = list(self.params)
        if not keys:  # models without tensors
            return {name: {} for name in self.names}
        columns = [t.unbind(0) for t in self.params.values()]
        return {name: dict(zip(keys, row)) for name, row in zip(self.names, zip(*columns))}

    def state_dict(self, name: str) -> StateDict:
        """One model's tensors (views)."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise InvalidArgumentError(f"the stack has no model {name!r}") from None
        return {k: t[i] for k, t in self.params.items()}

    def to(self, device: str | torch.device) -> Stack:
        """The stack on ``device``: a stack viewing stored records moves as one buffer
        (through pinned memory to a GPU)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if self._records is not None:
            from .paths.reader import record_columns

            buf, schema = self._records
            if device.type == "cuda":
                buf = buf.pin_memory() if buf.device.type == "cpu" else buf
            moved = buf.to(device)
            return Stack(self.names, record_columns(moved, schema, len(self.names)),
                         records=(moved, schema))  # fmt: skip
        return Stack(self.names, {k: _moved(t, device) for k, t in self.params.items()})

    def select(self, names: Sequence[str]) -> Stack:
        """The stack of ``names`` (in that order): the same stack where they are all
        its models in order, else one row gather per tensor."""
        names = tuple(names)
        if names == self.names:
            return self
        where = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise InvalidArgumentError(f"the stack has no model(s) {missing[:3]}")
        rows = torch.tensor([where[n] for n in names], dtype=torch.int64, device=self.device)
        return Stack(names, {k: t.index_select(0, rows) for k, t in self.params.items()})

    def forward(
        self,
        template: torch.nn.Module,
        x: Any,
        *,
        shared: bool = False,
        chunk_size: int | None = None,
    ) -> Any:
        """Outputs of all N models in one batched call: ``template`` (a module of this
        architecture, ideally on the meta device: only its structure is used) is run
        with each model's tensors by ``torch.func.functional_call`` under
        ``torch.vmap``. ``x`` is [N, batch, ...] (model i gets ``x[i]``), or, with
        ``shared``, one input every model gets. ``chunk_size`` bounds how many models
        run at once (memory; a Sequential of Linear layers and activations, run as
        batched matmuls, picks chunks whose activations stay in cache). Returns [N, ...]
        outputs, equal to a loop over the models up to float rounding.

        Limits: every parameter and buffer of the template must be in the stack (a
        non-persistent buffer is not stored: give the template real values for it);
        modules that update state in place while running (BatchNorm in training mode)
        or that torch.vmap does not support are refused with InvalidArgumentError
        naming them (call ``template.eval()`` for BatchNorm)."""
        from torch.func import functional_call

        extra = _template_tensors(template, self)
        n = len(self.names)
        if not shared and (not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != n):
            lead = (
                f"leading dimension {x.shape[0]}"
                if isinstance(x, torch.Tensor) and x.dim()
                else f"a {type(x).__name__}"
            )
            raise InvalidArgumentError(
                f"x has {lead}, but the stack holds {n} models: pass x as [models, batch, "
                "...], or shared=True to give every model the same input"
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
        steps = _direct_steps(template) if not extra else None
        if steps is not None and isinstance(x, torch.Tensor):
            try:
                return _run_direct(steps, self.params, x, shared, chunk_size, n)
            except RuntimeError as exc:
                raise InvalidArgumentError(f"the stack could not run on x: {exc}") from exc

        def one(params: StateDict, xi: Any) -> Any:
            return functional_call(template, {**extra, **params}, (xi,))

        run = torch.vmap(one, in_dims=(0, None if shared else 0), chunk_size=chunk_size)
        try:
            return run(self.params, x)
        except RuntimeError as exc:
            kinds = sorted({type(m).__name__ for m in template.modules()})
            raise InvalidArgumentError(
                f"the template ({', '.join(kinds)}) could not run batched over the stack under "
                f"torch.vmap: {exc}. Modules that update state in place or that vmap does not "
                "support cannot run stacked; loop over store.load_modules(...) instead"
            ) from exc


_ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid",
                "Softplus", "Hardtanh", "Hardswish", "Hardsigmoid", "Identity")  # fmt: skip
_ELEMENTWISE = tuple(getattr(torch.nn, name) for name in _ACTIVATIONS if hasattr(torch.nn, name))


def _direct_steps(template: torch.nn.Module) -> list[tuple[str, Any]] | None:
    """A ``Linear`` or a ``Sequential`` of ``Linear`` and elementwise activations (no
    hooks, classes exactly these) as steps that run stacked directly: each Linear one
    batched matmul over all models (``torch.vmap``'s rule for ``linear`` is several
    times slower on the CPU). None for anything else: then vmap runs it."""
    mods: list[tuple[str, torch.nn.Module]] | None = None
    if type(template) is torch.nn.Linear:
        mods = [("", template)]
    if type(template) is torch.nn.Sequential and not _hooked(template):
        mods = [(key + ".", m) for key, m in template._modules.items() if m is not None]
    if not mods:
        return None
    steps: list[tuple[str, Any]] = []
    for prefix, m in mods:
        if _hooked(m):
            return None
        kind: type = type(m)
        if kind is torch.nn.Linear:
            steps.append(("linear", prefix))
        elif kind in _ELEMENTWISE:
            steps.append(("apply", m))
        elif kind is not torch.nn.Dropout or (m.training and m.p != 0):
            return None
    return steps


def _hooked(m: torch.nn.Module) -> bool:
    """Forward hooks on ``m``, or registered for every module."""
    glob = torch.nn.modules.module
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or getattr(glob, "_global_forward_hooks", None)
        or getattr(glob, "_global_forward_pre_hooks", None)
    )


# Models per chunk on the direct path on the CPU by default: their widest activation
# about this many bytes, so that it stays in cache between layers (10,000 battery cells on 64 rows:
# 0.09 s in chunks of 100-500, 0.42 s all at once).
CHUNK_BYTES = 4 << 20


def _run_direct(steps: list[tuple[str, Any]], params: StateDict, x: torch.Tensor, shared: bool,
                chunk_size: int | None, n: int) -> torch.Tensor:  # fmt: skip
    """The steps on all models (``chunk_size`` at a time): [models, ..., out]."""
    if chunk_size is None and x.device.type != "cpu":  # a GPU: every model in one launch each
        chunk_size = n
    if chunk_size is None:
        rows = math.prod(x.shape[:-1] if shared else x.shape[1:-1])
        widest = max(
            [x.shape[-1]] + [params[w + "weight"].shape[1] for k, w in steps if k == "linear"]
        )
        chunk_size = max(1, CHUNK_BYTES // max(1, rows * widest * x.element_size()))
    step = chunk_size
    outs = []
    for start in range(0, n, step):
        end = min(n, start + step)
        h = x.unsqueeze(0).expand(end - start, *x.shape) if shared else x[start:end]
        fresh = False  # h is still the caller's input: never modified in place
        for kind, what in steps:
            if kind == "apply":
                h = what(h if fresh or not getattr(what, "inplace", False) else h.clone())
                fresh = True
                continue
            weight = params[what + "weight"][start:end]
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            out = torch.bmm(flat, weight.transpose(1, 2)).reshape(*h.shape[:-1], -1)
            bias = params.get(what + "bias")
            if bias is not None:
                b = bias[start:end]
                out = out.add_(b.reshape(b.shape[0], *([1] * (out.dim() - 2)), b.shape[-1]))
            h, fresh = out, True
        outs.append(h)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _template_tensors(template: torch.nn.Module, stack: Stack) -> StateDict:
    """Checks the template against the stack (its modules, its tensors' names and
    shapes); returns its own tensors the stack does not hold (non-persistent buffers:
    they must have data, and every model shares them)."""
    if not isinstance(template, torch.nn.Module):
        raise InvalidArgumentError(
            f"template must be a torch.nn.Module of the stack's architecture, got {type(template).__name__}"
        )
    for m in template.modules():
        if (
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.training
            and m.track_running_stats
        ):
            raise InvalidArgumentError(
                f"the template's {type(m).__name__} is in training mode: it would update its "
                "running statistics in place, which torch.vmap cannot batch; call template.eval()"
            )
    shapes = {k: tuple(t.shape[1:]) for k, t in stack.params.items()}
    own: StateDict = dict(template.named_parameters(remove_duplicate=False))
    own.update(template.named_buffers(remove_duplicate=False))
    wrong = [k for k, t in own.items() if k in shapes and tuple(t.shape) != shapes[k]]
    unknown = [k for k in shapes if k not in own]
    if wrong or unknown:
        what = (
            f"tensors {wrong[:3]} have other shapes than in the stack"
            if wrong
            else f"the stack holds {unknown[:3]}, which the template does not have"
        )
        raise InvalidArgumentError(f"the template is not the stack's architecture: {what}")
    extra = {k: t for k, t in own.items() if k not in stack.params}
    stored = set(module_state(template))  # what a save of the template would hold
    missing = [k for k in extra if k in stored]
    if missing:
        raise InvalidArgumentError(
            f"the template is not the stack's architecture: the stack lacks {missing[:3]}, "
            "which the template's state dict holds"
        )
    empty = [k for k, t in extra.items() if t.device.type == "meta"]
    if empty:
        raise InvalidArgumentError(
            f"the template's {empty[:3]} are not stored in the stack (non-persistent buffers) and "
            "are on the meta device: build the template with real values for them"
        )
    return extra


class StackedSet:
    """A version's models as stacks, one per architecture group, in the version's
    order of first appearance. A set of one architecture also answers ``names``,
    ``params`` and ``forward`` as its one stack does."""

    def __init__(self, groups: Sequence[Stack], order: Sequence[str] | None = None) -> None:
        self.groups = list(groups)
        self.order = list(order) if order is not None else None  # the version's model order

    def __iter__(self) -> Iterator[Stack]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"StackedSet({', '.join(map(repr, self.groups))})"

    @property
    def models(self) -> int:
        return sum(len(g) for g in self.groups)

    def _one(self, what: str) -> Stack:
        if len(self.groups) != 1:
            raise InvalidArgumentError(
                f"this set holds {len(self.groups)} architectures: use .groups[i].{what} "
                "(one stack per architecture)"
            )
        return self.groups[0]

    @property
    def names(self) -> tuple[str, ...]:
        return self._one("names").names

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._one("params").params

    def forward(self, template: torch.nn.Module, x: Any, **kwargs: Any) -> Any:
        return self._one("forward(...)").forward(template, x, **kwargs)

    def state_dicts(self) -> dict[str, StateDict]:
        """{name: state dict} of every model (views of the stacks), in the version's order
        (group by group for a set built without one)."""
        out: dict[str, StateDict] = {}
        for g in self.groups:
            out.update(g.state_dicts())
        return self.in_order(out)

    def in_order(self, by_name: dict[str, Any]) -> dict[str, Any]:
        """``by_name`` (one entry per model) in the version's order, where it is known."""
        if self.order is None or len(self.order) != len(by_name):
            return by_name
        return {name: by_name[name] for name in self.order}

    def to(self, device: str | torch.device) -> StackedSet:
        return StackedSet([g.to(device) for g in self.groups], self.order)


def stack_sets(models: Mapping[str, Mapping[str, torch.Tensor]]) -> StackedSet:
    """State dicts of any architectures as stacks: one per architecture, in order of
    first appearance (one copy per tensor name)."""
    by_layout: dict[Any, list[str]] = {}
    for name, sd in models.items():
        key = tuple((k, t.dtype, t.shape) for k, t in sd.items())
        by_layout.setdefault(key, []).append(name)
    return StackedSet(
        [Stack.from_state_dicts({n: models[n] for n in names}) for names in by_layout.values()],
        list(models),
    )


# -- modules ------------------------------------------------------------------

_CONTAINERS = (dict, set, list)
_TABLES = ("_parameters", "_buffers", "_modules")


class _ClonePlan:
    """How to build a module like ``template`` around given tensors without running
    ``__init__``: its modules in pre-order, each with its class, attributes, which
    attribute containers to copy (hook tables, ...: a clone's hooks stay its own),
    and which tensor slot fills each parameter and buffer. ``order`` names the slots
    (state-dict names; a parameter or module met twice is shared, as in the template)."""

    def __init__(self, template: torch.nn.Module) -> None:
        self.nodes: list[tuple[Any, ...]] = []
        self.order: list[str] = []
        index: dict[int, int] = {}
        slots: dict[int, int] = {}  # id(parameter or buffer) -> its slot: shared stays shared

        def visit(m: torch.nn.Module, prefix: str) -> int:
            if id(m) in index:
                return index[id(m)]
            at = index[id(m)] = len(self.nodes)
            self.nodes.append(())
            params: list[tuple[str, int | None, bool]] = []
            for key, p in m._parameters.items():
                slot = None
                if p is not None:
                    slot = slots.get(id(p))
                    if slot is None:
                        slot = slots[id(p)] = len(self.order)
                        self.order.append(prefix + key)
                params.append((key, slot, p is not None and p.requires_grad))
            buffers: list[tuple[str, int | None, torch.Tensor | None]] = []
            for key, b in m._buffers.items():
                if b is None or key in m._non_persistent_buffers_set:
                    buffers.append((key, None, b))  # not stored: each clone gets a copy
                    continue
                slot = slots.get(id(b))
                if slot is None:
                    slot = slots[id(b)] = len(self.order)
                    self.order.append(prefix + key)
                buffers.append((key, slot, None))
            children = [(key, None if c is None else visit(c, prefix + key + "."))
                        for key, c in m._modules.items()]  # fmt: skip
            copied = [
                k for k, v in m.__dict__.items() if isinstance(v, _CONTAINERS) and k not in _TABLES
            ]
            self.nodes[at] = (type(m), m.__dict__, copied, params, buffers, children)
            return at

        visit(template, "")

    def build(self, tensors: Sequence[torch.Tensor]) -> torch.nn.Module:
        # every module object first: a module shared by two parents may come after either
        made: list[Any] = [node[0].__new__(node[0]) for node in self.nodes]
        shared: dict[int, torch.nn.Parameter] = {}
        parameter = torch.nn.Parameter
        for at, (_cls, base, copied, params, buffers, children) in enumerate(self.nodes):
            d = base.copy()
            for key in copied:
                d[key] = base[key].copy()
            own: dict[str, torch.nn.Parameter | None] = {}
            for key, slot, grad in params:
                if slot is None:
                    own[key] = None
                    continue
                p = shared.get(slot)
                if p is None:
                    p = shared[slot] = parameter(tensors[slot], requires_grad=grad)
                own[key] = p
            d["_parameters"] = own
            d["_buffers"] = {key: tensors[slot] if slot is not None else (b if b is None else b.clone())
                             for key, slot, b in buffers}  # fmt: skip
            d["_modules"] = {key: None if child is None else made[child] for key, child in children}
            object.__setattr__(made[at], "__dict__", d)
        return made[0]  # type: ignore[no-any-return]


def build_modules(
    stack: Stack, factory: Callable[[str], torch.nn.Module]
) -> dict[str, torch.nn.Module]:
    """One module per model of ``stack``: ``factory(first name)`` is built once as the
    template and checked against the stored tensors (names, dtypes, shapes, as a
    strict ``load_state_dict`` would), then cloned per model with that model's
    tensors (views of the stack) as its parameters and buffers."""
    template = factory if isinstance(factory, torch.nn.Module) else factory(stack.names[0])
    if not isinstance(template, torch.nn.Module):
        raise InvalidArgumentError(
            f"factory must return a torch.nn.Module, got {type(template).__name__}"
        )
    want = module_state(template)
    have = stack.params
    if list(want) != list(have):
        missing = [k for k in want if k not in have]
        unexpected = [k for k in have if k not in want]
        raise InvalidModelSetError(
            f"the factory's module does not match the stored models ({stack.names[0]!r}, ...): "
            f"its tensors {missing[:3]} are not stored, stored tensors {unexpected[:3]} are not its"
            + ("" if missing or unexpected else "; the tensors are in another order")
        )
    for k, t in want.items():
        if t.dtype != have[k].dtype or t.shape != have[k].shape[1:]:
            raise InvalidModelSetError(
                f"the factory's module does not match the stored models: tensor {k!r} is "
                f"{t.dtype} {tuple(t.shape)} there, {have[k].dtype} {tuple(have[k].shape[1:])} stored"
            )
    _refuse_meta_buffers(template)
    plan = _ClonePlan(template)
    odd = [k for k in plan.order if k not in have]
    if odd:
        raise InvalidModelSetError(
            f"the factory's module customises its state dict: its tensors {odd[:3]} are not "
            "stored under those names, so its clones cannot take the stored tensors; load the "
            "state dicts with store.load and load_state_dict instead"
        )
    columns = [have[k].unbind(0) for k in plan.order]
    rows = zip(*columns) if columns else [()] * len(stack.names)  # (models without tensors)
    with gc_paused():  # many small objects, no cycles among them
        return {name: plan.build(row) for name, row in zip(stack.names, rows)}


def _refuse_meta_buffers(template: torch.nn.Module) -> None:
    """Buffers that are not stored (non-persistent) are copied from the template into
    every clone: on the meta device they would have no data."""
    for m in template.modules():
        for key in m._non_persistent_buffers_set:
            b = m._buffers.get(key)
            if b is not None and b.device.type == "meta":
                raise InvalidArgumentError(
                    f"the template's buffer {key!r} is not stored (non-persistent) and is on the "
                    "meta device: build the template with real values for it"
                )
