"""The paper's battery use case: one small FFNN (5->48->48->48->1, 5,041
parameters) per battery cell, and a trainer that retrains thousands of cells as
ONE batched computation (stacked weights, batched matmuls).

>>> from mmcore.examples import battery
>>> cells = battery.make_cells(4, seed=0)
>>> data = battery.make_data(list(cells), rows=64, seed=1)
>>> trained = battery.train(cells, data, lr=0.01, epochs=1, seed=0)
>>> sorted(trained) == sorted(cells)
True

Importing this module registers ``train_stacked`` (the stacked form: it takes the
``Stack`` that ``load_stacked`` gives) as ``"mmcore.examples.battery.sgd"``;
``train`` is the same on state dicts.
The data is synthetic (a per-cell voltage curve over current, temperature and
state of charge, with noise); the benchmark issue brings real physics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import InvalidArgumentError
from ..provenance import trainer
from ..stacked import Stack

LAYERS = (5, 48, 48, 48, 1)
KEYS = (
    ("0.weight", "0.bias"),
    ("2.weight", "2.bias"),
    ("4.weight", "4.bias"),
    ("6.weight", "6.bias"),
)
TRAINER = "mmcore.examples.battery.sgd"
StateDicts = dict[str, dict[str, torch.Tensor]]


def ffnn() -> torch.nn.Sequential:
    """The cell's network as a module (its state dict has the keys of ``make_cells``):
    Linear layers with ReLU between them."""
    mods: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        mods.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(LAYERS) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def make_cells(n: int, seed: int = 0) -> StateDicts:
    """``n`` cells' state dicts (``cell_000000``, ...), initialised as ``nn.Linear``
    does (uniform in +-1/sqrt(fan_in)); each tensor is its own contiguous memory."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n must be a non-negative int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    stacked = []
    for (w, b), fan_in, fan_out in zip(KEYS, LAYERS[:-1], LAYERS[1:]):
        bound = 1 / math.sqrt(fan_in)
        stacked.append((w, (torch.rand(n, fan_out, fan_in, generator=g) * 2 - 1) * bound))
        stacked.append((b, (torch.rand(n, fan_out, generator=g) * 2 - 1) * bound))
    return {f"cell_{i:06d}": {key: t[i].clone() for key, t in stacked} for i in range(n)}


def make_data(
    names: Sequence[str], rows: int = 256, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Per cell ``{"x": (rows, 5), "y": (rows, 1)}`` float32: inputs (current,
    temperature, state of charge, cycle age, a bias term) and the terminal voltage
    of a cell with its own capacity and resistance, plus measurement noise."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InvalidArgumentError(f"rows must be a positive int, got {rows!r}")
    g = torch.Generator().manual_seed(seed)
    n = len(names)
    current = torch.rand(n, rows, generator=g) * 4 - 2  # A, charge < 0 < discharge
    temperature = torch.rand(n, rows, generator=g) * 40 - 5  # deg C
    soc = torch.rand(n, rows, generator=g)
    age = torch.rand(n, 1, generator=g).expand(n, rows)
    resistance = 0.05 + 0.03 * torch.rand(n, 1, generator=g)
    ocv = 3.2 + 0.9 * soc - 0.15 * (1 - soc) ** 3 - 0.05 * age
    voltage = (
        ocv
        - current * resistance * (1 + 0.01 * (25 - temperature))
        + 0.005 * torch.randn(n, rows, generator=g)
    )
    x = torch.stack([current / 2, temperature / 40, soc, age, torch.ones(n, rows)], dim=-1)
    y = (voltage - 3.6).unsqueeze(-1)
    return {name: {"x": x[i].clone(), "y": y[i].clone()} for i, name in enumerate(names)}


@trainer(TRAINER, stacked=True)
def train_stacked(models: Stack, data: Stack, *, lr: float, epochs: int, seed: int,
                  batch_size: int = 16) -> dict[str, torch.Tensor]:  # fmt: skip
    """MSE loss, plain SGD, mini-batches of ``batch_size`` rows, ALL cells at once on
    their stacked weights (as ``load_stacked`` gives them): each layer one batched
    matmul, forward and backward written out (the weight update fused into the
    gradient's matmul). The loss is each cell's own mean, so each cell's gradient is
    the one it would get alone; every cell sees its rows in the same seeded order,
    so the result is, up to float rounding, each cell trained alone with the same
    seed and data. Runs where the models are (CPU or one GPU); returns the stacked
    weights in the models' dtype."""
    keys = [key for pair in KEYS for key in pair]
    stored = [models.params[key] for key in keys]
    device = stored[0].device
    params = [p.to(device=device, dtype=torch.float32, copy=True) for p in stored]
    weights, biases = params[0::2], params[1::2]
    x = data.params["x"].to(device=device, dtype=torch.float32)
    y = data.params["y"].to(device=device, dtype=torch.float32)
    rows, last = x.shape[1], len(KEYS) - 1
    order_rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(rows, generator=order_rng).to(device)
        xs, ys = x[:, order], y[:, order]  # this epoch's row order: each mini-batch a slice
        for start in range(0, rows, batch_size):
            acts = [xs[:, start : start + batch_size]]  # the input of each layer
            pre = []  # each hidden layer's pre-activation
            for layer in range(len(KEYS)):
                z = torch.baddbmm(
                    biases[layer].unsqueeze(1), acts[-1], weights[layer].transpose(1, 2)
                )
                if layer < last:
                    pre.append(z)
                    z = z.relu()
                acts.append(z)
            # d(mean squared error)/d(output), per cell
            grad = (acts[-1] - ys[:, start : start + batch_size]).mul_(2.0 / acts[-1][0].numel())
            for layer in range(last, -1, -1):
                below = None
                if layer > 0:  # with the weights before this step's update
                    below = _relu_backward(torch.bmm(grad, weights[layer]), pre[layer - 1])
                weights[layer].baddbmm_(grad.transpose(1, 2), acts[layer], alpha=-lr)
                biases[layer].sub_(grad.sum(dim=1), alpha=lr)
                if below is not None:
                    grad = below
    return {key: p.to(s.dtype) for key, p, s in zip(keys, params, stored)}


def train(models: Mapping[str, Mapping[str, torch.Tensor]], data: Mapping[str, Mapping[str, torch.Tensor]],
          *, lr: float, epochs: int, seed: int, batch_size: int = 16) -> StateDicts:  # fmt: skip
    """``train_stacked`` on state dicts: stacked once, trained, returned as views of the
    trained stacks (the form a caller holding state dicts uses)."""
    names = list(models)
    if not names:
        return {}
    stack = Stack.from_state_dicts({n: models[n] for n in names})
    rows = Stack.from_state_dicts({n: data[n] for n in names})
    out = train_stacked(stack, rows, lr=lr, epochs=epochs, seed=seed, batch_size=batch_size)
    return Stack(names, out).state_dicts()


def _relu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``pre`` > 0, else 0: one fused pass (autograd's own ReLU backward)."""
    out: torch.Tensor = torch.ops.aten.threshold_backward.default(grad, pre, 0)
    return out


def train_one_by_one(models: Mapping[str, Mapping[str, torch.Tensor]],
                     data: Mapping[str, Mapping[str, torch.Tensor]], **kwargs: float) -> StateDicts:  # fmt: skip
    """The same trainer, one cell at a time: the baseline batched training beats."""
    out: StateDicts = {}
    for name in models:
        out.update(train({name: models[name]}, {name: data[name]}, **kwargs))  # type: ignore[arg-type]
    return out
