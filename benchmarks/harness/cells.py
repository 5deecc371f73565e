"""Per-cell training data for the battery benchmark, simulated with PyBaMM.

Each *distinct* cell is a physics model (SPMe with a lumped thermal model, the
Chen2020 parameters of an LG M50 21700 cell, 5 Ah nominal) with its own seeded
capacity, resistance and particle diffusivities, its own ambient temperature and
its own drive current (a mean discharge plus three sinusoids). The model is
built and discretised ONCE per process, with every varied quantity a
``pybamm.InputParameter``; each cell is then one solve with its inputs (about
0.1 s). ``aged=True`` gives the same cells after ageing, driven by a new
profile. Results are cached as one ``.npz`` per call signature.

:func:`cell_data` turns the simulated cells into the ``{"x", "y"}`` tensors that
:func:`mmcore.examples.battery.train` takes, for any number of cell names (name
``i`` uses simulated cell ``i % distinct``, plus a seeded per-cell perturbation:
sensor errors and a small extra resistance), vectorised; :func:`rmse_mv` is the
per-cell voltage error of the FFNNs in millivolts, batched.

PyBaMM is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

VERSION = 1  # bump when the simulation changes: it is part of the cache key
ROWS = 256  # default rows per cell: samples on the fixed time grid
DURATION_S = 3600.0  # each drive profile lasts one hour, sampled at ROWS points
SUBSTEPS = 4  # the solver output is ``SUBSTEPS`` times finer, for the integrals

NOMINAL_AH = 5.0  # Chen2020 (LG M50) nominal capacity
R_REF_OHM = 0.025  # the Chen2020 SPMe's ohmic + kinetic resistance at 25 degC, 50% SOC
EMA_TAU_S = 120.0  # time constant of the current's moving average (polarisation history)

# x = (raw - X_OFFSET) / X_SCALE, the raw columns: current (A), cell temperature
# (degC), SOC, charge throughput (Ah), the current's moving average (A); the
# constants standardise the simulated cells (mean ~0, standard deviation ~1)
X_OFFSET = (1.5, 25.0, 0.65, 1.0, 1.5)
X_SCALE = (2.0, 7.0, 0.15, 0.7, 1.5)
V_OFFSET = 3.8  # V: y = (voltage - V_OFFSET) * Y_SCALE
Y_SCALE = 6.0

# the seeded per-cell perturbation of cell_data (standard deviations)
V_NOISE_V = 0.0015  # voltage measurement noise, per sample
I_GAIN = 0.005  # current sensor gain error, per cell
T_OFFSET_K = 0.5  # temperature sensor offset, per cell
R_EXTRA_OHM = 0.0005  # extra series resistance (cell-to-cell variation), per cell

SERIES = ("time", "current", "temperature", "voltage", "soc", "throughput", "current_avg")
_SCALARS = ("capacity_ah", "soc0", "retries")
_SOLVE_RETRIES = 5
_MILDER = 0.7  # each retry scales the profile's amplitudes and mean current by this


def simulate(
    distinct: int,
    *,
    aged: bool,
    seed: int,
    cache_dir: Path,
    progress: Callable[[int], None] | None = None,
    rows: int = ROWS,
) -> list[dict[str, np.ndarray]]:
    """``distinct`` cells simulated with PyBaMM, each a dict of float64 arrays of
    length ``rows`` on the grid ``linspace(0, DURATION_S, rows)``:

    ``time`` (s), ``current`` (A, discharge > 0), ``temperature`` (cell, degC),
    ``voltage`` (terminal, V), ``soc`` (coulomb counting over the cell's own
    capacity, from its initial SOC), ``throughput`` (cumulative |current|, Ah),
    ``current_avg`` (the current's exponential moving average, time constant
    EMA_TAU_S, from rest at 0 A), and 0-d arrays ``capacity_ah``, ``soc0`` and
    ``retries`` (how many times the profile was made milder, see below).

    Cell ``i`` (seeded by ``(seed, i)``, the same cell whether ``aged`` or not):
    electrode height (so capacity) x U(0.95, 1.05); contact resistance
    U(2, 8) mOhm on top of the model's ~25 mOhm; each electrode's particle
    diffusivity x U(0.8, 1.2). Its drive profile: ambient (and initial)
    temperature U(10, 35) degC, initial SOC U(0.7, 0.9), mean discharge
    U(0.2, 0.5) C, and three sinusoids with amplitudes U(0.1, 0.5) C, periods
    log-uniform in 100..1800 s and random phases (C = the cell's own capacity).
    ``aged``: capacity x U(0.8, 0.9), resistance + U(30, 60)% of the fresh cell's
    (added as contact resistance), diffusivities x U(0.5, 0.8), and a new profile
    (new temperature, SOC, currents) from a different seed stream.

    A solve that fails or stops early (a voltage cut-off) is retried with the
    mean current and the amplitudes scaled by 0.7, up to 5 times.

    Cached in ``cache_dir`` as one ``.npz`` per (distinct, aged, seed, rows,
    DURATION_S, SUBSTEPS, VERSION), written atomically. ``progress(1)`` is called
    after each simulated cell (tqdm's ``update`` fits); not on a cache hit.
    """
    if isinstance(distinct, bool) or not isinstance(distinct, int) or distinct < 1:
        raise ValueError(f"distinct must be a positive int, got {distinct!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
        raise ValueError(f"rows must be an int >= 2, got {rows!r}")
    cache_dir = Path(cache_dir)
    path = cache_dir / (
        f"cells-v{VERSION}-d{distinct}-{'aged' if aged else 'fresh'}-s{seed}"
        f"-r{rows}-t{DURATION_S:g}-k{SUBSTEPS}.npz"
    )
    if path.exists():
        with np.load(path) as z:
            return [{key: z[f"{i}/{key}"] for key in (*SERIES, *_SCALARS)}
                    for i in range(distinct)]  # fmt: skip
    cells = []
    for i in range(distinct):
        cells.append(_simulate_cell(i, aged=aged, seed=seed, rows=rows))
        if progress is not None:
            progress(1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i}/{key}": value for i, cell in enumerate(cells) for key, value in cell.items()}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return cells


def _cell_inputs(i: int, *, aged: bool, seed: int) -> tuple[dict[str, float], float, float]:
    """The cell's PyBaMM inputs, its capacity (Ah) and its initial SOC."""
    cell = np.random.default_rng([seed, i, 0])  # the cell itself: same fresh or aged
    height = cell.uniform(0.95, 1.05)
    contact = cell.uniform(0.002, 0.008)
    dn, dp = cell.uniform(0.8, 1.2, size=2)
    if aged:
        ageing = np.random.default_rng([seed, i, 1])
        height *= ageing.uniform(0.8, 0.9)
        contact += ageing.uniform(0.3, 0.6) * (R_REF_OHM + contact)
        dn, dp = dn * ageing.uniform(0.5, 0.8), dp * ageing.uniform(0.5, 0.8)
    drive = np.random.default_rng([seed, i, 3 if aged else 2])  # the profile
    capacity = NOMINAL_AH * height
    soc0 = drive.uniform(0.7, 0.9)
    inputs = {
        "Height factor": height,
        "Contact resistance input [Ohm]": contact,
        "Negative diffusivity factor": dn,
        "Positive diffusivity factor": dp,
        "Ambient temperature input [K]": 273.15 + drive.uniform(10.0, 35.0),
        "Initial SOC": soc0,
        "Mean current [A]": drive.uniform(0.2, 0.5) * capacity,
    }
    for k in range(3):
        inputs[f"Amplitude {k} [A]"] = drive.uniform(0.1, 0.5) * capacity
        inputs[f"Period {k} [s]"] = math.exp(drive.uniform(math.log(100.0), math.log(1800.0)))
        inputs[f"Phase {k}"] = drive.uniform(0.0, 2 * math.pi)
    return {key: float(value) for key, value in inputs.items()}, float(capacity), float(soc0)


@functools.lru_cache(maxsize=1)
def _simulation() -> Any:
    """The SPMe + lumped thermal model, parameterised with inputs and discretised
    once (the first solve builds it)."""
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")  # no prompt, nothing sent
    import pybamm

    pybamm.set_logging_level("ERROR")
    model = pybamm.lithium_ion.SPMe(options={"thermal": "lumped", "contact resistance": "true"})
    p = pybamm.ParameterValues("Chen2020")
    inp = pybamm.InputParameter
    # initial stoichiometries at SOC 0 and 1 (linear in SOC in between, as PyBaMM's
    # own initial_soc does)
    x0, x100, y100, y0 = pybamm.lithium_ion.get_min_max_stoichiometries(p)
    cn_max = p["Maximum concentration in negative electrode [mol.m-3]"]
    cp_max = p["Maximum concentration in positive electrode [mol.m-3]"]
    soc = inp("Initial SOC")
    dn = p["Negative particle diffusivity [m2.s-1]"]
    dp = p["Positive particle diffusivity [m2.s-1]"]

    def current(t: Any) -> Any:
        out = inp("Mean current [A]")
        for k in range(3):
            phase = 2 * math.pi * t / inp(f"Period {k} [s]") + inp(f"Phase {k}")
            out = out + inp(f"Amplitude {k} [A]") * pybamm.sin(phase)
        return out

    temperature = inp("Ambient temperature input [K]")
    p.update(
        {
            "Electrode height [m]": p["Electrode height [m]"] * inp("Height factor"),
            "Contact resistance [Ohm]": inp("Contact resistance input [Ohm]"),
            "Negative particle diffusivity [m2.s-1]": dn * inp("Negative diffusivity factor"),
            "Positive particle diffusivity [m2.s-1]": dp * inp("Positive diffusivity factor"),
            "Ambient temperature [K]": temperature,
            "Initial temperature [K]": temperature,
            "Initial concentration in negative electrode [mol.m-3]": (x0 + soc * (x100 - x0))
            * cn_max,
            "Initial concentration in positive electrode [mol.m-3]": (y0 + soc * (y100 - y0))
            * cp_max,
            "Current function [A]": current,
        }
    )
    return pybamm.Simulation(model, parameter_values=p, solver=pybamm.IDAKLUSolver())


def _simulate_cell(i: int, *, aged: bool, seed: int, rows: int) -> dict[str, np.ndarray]:
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")  # no prompt, nothing sent
    import pybamm

    sim = _simulation()
    inputs, capacity, soc0 = _cell_inputs(i, aged=aged, seed=seed)
    fine = np.linspace(0.0, DURATION_S, (rows - 1) * SUBSTEPS + 1)
    sol, retries = None, 0
    while sol is None:
        try:
            sol = sim.solve([0.0, DURATION_S], t_interp=fine, inputs=inputs)
            if sol.t[-1] < DURATION_S * (1 - 1e-9) or len(sol.t) != len(fine):
                sol = None  # stopped early: a voltage cut-off
        except pybamm.SolverError:
            sol = None
        if sol is None:
            retries += 1
            if retries > _SOLVE_RETRIES:
                raise RuntimeError(f"cell {i} (aged={aged}, seed={seed}): no solve reached the end")
            for key in inputs:
                if key.startswith(("Mean current", "Amplitude")):
                    inputs[key] *= _MILDER
    current = np.asarray(sol["Current [A]"].entries, dtype=np.float64)
    dt = np.diff(fine)
    charge = np.concatenate([[0.0], np.cumsum(0.5 * (current[1:] + current[:-1]) * dt)]) / 3600
    through = np.concatenate([[0.0], np.cumsum(0.5 * np.abs(current[1:] + current[:-1]) * dt)])
    avg = np.zeros_like(current)  # exact for a current linear between samples
    for j in range(1, len(fine)):
        a = math.exp(-dt[j - 1] / EMA_TAU_S)
        avg[j] = a * avg[j - 1] + (1 - a) * 0.5 * (current[j] + current[j - 1])
    out = {
        "time": fine,
        "current": current,
        "temperature": np.asarray(sol["X-averaged cell temperature [C]"].entries),
        "voltage": np.asarray(sol["Voltage [V]"].entries),
        "soc": soc0 - charge / capacity,
        "throughput": through / 3600,
        "current_avg": avg,
    }
    cell = {key: np.asarray(value[::SUBSTEPS], dtype=np.float64) for key, value in out.items()}
    cell["capacity_ah"] = np.asarray(capacity)
    cell["soc0"] = np.asarray(soc0)
    cell["retries"] = np.asarray(retries)
    return cell


def time_per_cell(*, aged: bool, seed: int = 0, cells: int = 3, rows: int = ROWS) -> float:
    """Seconds to simulate one cell (median of ``cells``), the model already built."""
    _simulation()
    _simulate_cell(0, aged=aged, seed=seed, rows=rows)  # build/compile outside the timing
    times = []
    for i in range(cells):
        start = time.perf_counter()
        _simulate_cell(i, aged=aged, seed=seed, rows=rows)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cell_data(
    names: Sequence[str],
    *,
    distinct: int,
    aged: bool,
    seed: int,
    cache_dir: Path,
    rows: int = ROWS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per name ``{"x": (rows, 5), "y": (rows, 1)}`` float32 (views into two shared
    tensors), name ``i`` from simulated cell ``i % distinct`` (:func:`simulate`).

    x columns, each (raw - X_OFFSET[k]) / X_SCALE[k] (standardised, O(1)):
    0 measured current (A, discharge > 0; (I - 1.5) / 2); 1 measured cell
    temperature (degC; (T - 25) / 7); 2 SOC by coulomb counting of the measured
    current ((SOC - 0.65) / 0.15); 3 charge throughput (Ah; (Ah - 1) / 0.7); 4 the
    measured current's moving average (EMA_TAU_S = 120 s, polarisation history;
    (A - 1.5) / 1.5). y = (voltage - V_OFFSET) * Y_SCALE, V_OFFSET = 3.8 V,
    Y_SCALE = 6 (so 1 mV is 0.006).

    Per-cell perturbation (seeded by ``seed``, per name position; the same cell
    keeps its sensors and extra resistance whether ``aged`` or not): current
    gain x (1 + N(0, 0.5%)) on the measured current, its moving average, the
    coulomb-counted charge and the throughput; temperature offset N(0, 0.5 K);
    extra series resistance N(0, 0.5 mOhm) (cell-to-cell variation, true
    voltage); voltage measurement noise N(0, 1.5 mV) per sample (seeded by
    ``seed`` and ``aged``).
    """
    sims = simulate(
        distinct, aged=aged, seed=seed, cache_dir=cache_dir, progress=progress, rows=rows
    )
    n = len(names)

    def series(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([c[key] for c in sims])).to(torch.float32)

    index = torch.arange(n) % distinct
    soc0 = series("soc0")[index].unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    gain = 1 + I_GAIN * torch.randn(n, 1, generator=g)
    t_off = T_OFFSET_K * torch.randn(n, 1, generator=g)
    r_extra = R_EXTRA_OHM * torch.randn(n, 1, generator=g)
    noise = torch.Generator().manual_seed(seed * 2 + 1 + int(aged))
    current = series("current")[index]
    x = torch.empty(n, rows, 5)
    torch.mul(current, gain, out=x[..., 0])
    torch.add(series("temperature")[index], t_off, out=x[..., 1])
    torch.addcmul(soc0, series("soc")[index] - soc0, gain, out=x[..., 2])
    torch.mul(series("throughput")[index], gain, out=x[..., 3])
    torch.mul(series("current_avg")[index], gain, out=x[..., 4])
    x.sub_(torch.tensor(X_OFFSET)).div_(torch.tensor(X_SCALE))
    y = torch.randn(n, rows, generator=noise).mul_(V_NOISE_V)
    y.add_(series("voltage")[index]).addcmul_(current, r_extra, value=-1)
    y.sub_(V_OFFSET).mul_(Y_SCALE)
    y = y.unsqueeze(-1)
    return {name: {"x": xi, "y": yi} for name, xi, yi in zip(names, x.unbind(0), y.unbind(0))}


def rmse_mv(
    models: Mapping[str, Mapping[str, torch.Tensor]],
    data: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    chunk: int = 4096,
) -> torch.Tensor:
    """Per-cell voltage RMSE (mV) of the FFNNs (``0.weight`` ... ``6.bias``, ReLU
    between layers) on their data, in the order of ``models``: weights stacked,
    each layer one ``torch.baddbmm``, ``chunk`` cells at a time."""
    names = list(models)
    layers = ("0", "2", "4", "6")
    out = []
    with torch.no_grad():
        for start in range(0, len(names), chunk):
            part = names[start : start + chunk]
            z = torch.stack([data[n]["x"] for n in part]).to(torch.float32)
            for k, layer in enumerate(layers):
                w = torch.stack([models[n][f"{layer}.weight"] for n in part]).to(z)
                b = torch.stack([models[n][f"{layer}.bias"] for n in part]).to(z)
                z = torch.baddbmm(b.unsqueeze(1), z, w.transpose(1, 2))
                if k < len(layers) - 1:
                    z = z.relu_()
            y = torch.stack([data[n]["y"] for n in part]).to(z)
            err = (z - y).square_().mean(dim=(1, 2)).sqrt_()
            out.append(err * (1000.0 / Y_SCALE))
    return torch.cat(out) if out else torch.empty(0)
