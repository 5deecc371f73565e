"""Tables, plots and the issue's bars from the harness's results files.

``update_results_md(results_dir, results_md)`` rewrites the part of RESULTS.md
between the harness markers from the harness's results files in ``results_dir``
(other ``*.json`` there, another benchmark's, are named and left out; nothing else
in the file changes); ``plot(path)`` writes the PNG beside a results file
(matplotlib; skipped with a note when it is not installed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmcore._units import human_bytes

BEGIN = "<!-- harness:begin (written by python -m benchmarks.run; edits here are lost) -->"
END = "<!-- harness:end -->"
ORDER = {"quick": 1, "full": 0}


def _mb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} KB"


def _t(s: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["runs"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _err(r: dict[str, Any]) -> str:
    if r["exact"]:
        return "exact"
    tol = r.get("tolerance")
    e = r["max_error"]
    text = "inf" if math.isinf(e) else f"{e:.2g}"
    return f"{text} (tol {tol:g})" if tol is not None else text


def _metric(r: dict[str, Any], original: float | None, digits: int) -> str:
    if r.get("metric") is None or original is None:
        return "-"
    delta = r["metric"] - original
    return f"{r['metric']:.{digits}f} ({delta:+.{digits}f})"


def set_table(s: dict[str, Any], metric_name: str, digits: int) -> list[str]:
    head = ("| method | save s | recover s | one model ms | stored | of baseline | save, x raw rate "
            f"| recover, x raw rate | max error | {metric_name} (change) |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for r in s["rows"]:
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed']} |" + " |" * 8)
            continue
        stored = _mb(r["stored_bytes"])
        if r.get("dataset_bytes"):
            stored += f" + dataset {_mb(r['dataset_bytes'])}"
        of_base = r.get("stored_of_baseline")
        lines.append(
            f"| {r['method']} | {_t(r['save_s'])} | {_t(r['recover_s'])} | "
            f"{_t(r['recover_one_ms'], digits=2)} | {stored} | "
            f"{'-' if of_base is None else f'{of_base:.2%}'} | {_x(r.get('save_of_raw'))} | "
            f"{_x(r.get('recover_of_raw'))} | {_err(r)} | {_metric(r, s['metric_original'], digits)} |"
        )
    enc = s.get("encoder")
    if enc:
        parts = [
            f"mmcore's encoder {enc['mmcore']['ratio']:.1%} at {enc['mmcore']['gbps']:.2f} GB/s"
        ]
        if "zipnn" in enc:
            parts.append(f"ZipNN {enc['zipnn']['ratio']:.1%} at {enc['zipnn']['gbps']:.2f} GB/s")
        lines.append("")
        lines.append(f"XOR deltas of this version ({_mb(enc['plain_bytes'])}, every tensor): "
                     + "; ".join(parts) + " (compressed size, input rate; medians).")  # fmt: skip
    for note in s.get("notes", []):
        lines.append("")
        lines.append(f"Note: {note}.")
    return lines


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    gpu = f"; GPU {m['gpu']}" if m.get("gpu") else ""
    zipnn = m.get("zipnn") or "not installed"
    return (f"{m['cpu']}; {m['memory_gib']} GiB; disk: {m['disk']}{gpu}; Python {m['python']}, "
            f"torch {m['torch']}, mmcore {m['mmcore']}, ZipNN {zipnn}; device {m['device']}")  # fmt: skip


def battery_section(res: dict[str, Any], tag: str) -> list[str]:
    tr = res["training"]
    cfg = res["config"]
    out = [
        f"Cells: {cfg['cells']:,}, from {cfg['distinct']} PyBaMM-simulated cells (SPMe, lumped "
        f"thermal) and seeded perturbation; {tr['rows']} rows each. Trained together "
        f"({tr['params']['epochs']} epochs) in {tr['train_s']:.1f} s: voltage RMSE median "
        f"{tr['rmse_mv']['median']:.1f} mV (p10 {tr['rmse_mv']['p10']:.1f}, p90 "
        f"{tr['rmse_mv']['p90']:.1f}); the same models on aged-cell data: "
        f"{tr['rmse_mv_on_aged_before_retraining']['median']:.1f} mV, hence the retraining.",
        "",
    ]
    for s in res["sets"]:
        out.append(f"**{s['set']}** ({s['models']:,} models, {_mb(s['logical_bytes'])})")
        rt = s.get("retrained")
        if rt:
            out.append(
                f"  retrained {rt['cells']:,} cells in {rt['train_s']:.1f} s; their RMSE on aged "
                f"data {rt['rmse_mv_before']['median']:.1f} -> {rt['rmse_mv_after']['median']:.1f} mV"
            )
        out.append("")
        out += set_table(s, "RMSE mV", 2)
        out.append("")
    out.append(f"![battery](results/{tag}-battery.png)")
    return out


def image_section(res: dict[str, Any], tag: str) -> list[str]:
    out = []
    for a in res["archs"]:
        out.append(f"- {a['arch']}: {a['params']:,} parameters ({a['definition']}); base top-1 "
                   f"{a['base_top1']:.1f}% after {a['base_train_s']:.0f} s of training")  # fmt: skip
    out.append("")
    for s in res["sets"]:
        out.append(
            f"**{s['set']}** ({_mb(s['logical_bytes'])}; parent: the base, deployed once per task)"
        )
        out.append("")
        out += set_table(s, "top-1 %", 2)
        out.append("")
    out.append(f"![image](results/{tag}-image.png)")
    return out


def _meta(v: float | None) -> str:
    return "- (compressed)" if v is None else f"{v:.1f}"


def scale_section(res: dict[str, Any], tag: str) -> list[str]:
    head = "| cells | method | save s | recover s | one model ms | metadata B/model | save GB/s | recover GB/s |"
    out = [f"{res['note'][0].upper()}{res['note'][1:]}.", "", head, "|" + "---|" * 8]
    for p in res["points"]:
        for r in p["rows"]:
            if "failed" in r:
                out.append(f"| {p['cells']:,} | {r['method']} | failed: {r['failed']} |" + " |" * 5)
                continue
            out.append(
                f"| {p['cells']:,} | {r['method']} | {_t(r['save_s'])} | {_t(r['recover_s'])} | "
                f"{_t(r['recover_one_ms'], digits=2)} | {_meta(r['metadata_bytes_per_model'])} | "
                f"{r['save_gbps']:.2f} | {r['recover_gbps']:.2f} |"
            )
    out += ["", f"![scale](results/{tag}-scale.png)"]
    return out


# -- the bars --------------------------------------------------------------


def _row(s: dict[str, Any], method: str) -> dict[str, Any] | None:
    return next((r for r in s["rows"] if r["method"] == method and "failed" not in r), None)


def bars(res: dict[str, Any]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    if res["part"] == "battery":
        s = res["sets"][0]
        mm, raw = _row(s, "mmcore baseline"), _row(s, "raw bytes, one write (floor)")
        assert mm is not None and raw is not None
        others = [r for r in s["rows"] if r["family"] == "peer" and r.get("exact")]
        for what in ("save", "recover"):
            best = min(others, key=lambda r: r[f"{what}_s"]["median"], default=None)
            if best is not None:
                ok = mm[f"{what}_s"]["median"] < best[f"{what}_s"]["median"]
                out.append((f"{s['models']:,} cells, {what}: mmcore baseline "
                            f"{mm[f'{what}_s']['median']:.3f} s, best other lossless "
                            f"({best['method']}) {best[f'{what}_s']['median']:.3f} s", ok))  # fmt: skip
            ratio = mm[f"{what}_s"]["median"] / raw[f"{what}_s"]["median"]
            out.append((f"{s['models']:,} cells, {what}: mmcore baseline {ratio:.2f}x the raw "
                        "bytes' time (bar: within 1.2x)", ratio <= 1.2))  # fmt: skip
    if res["part"] == "image":
        for s in res["sets"]:
            base = _row(s, "mmcore baseline")
            assert base is not None
            if s["mode"] == "head":
                r = _row(s, "mmcore update, lossless")
                if r is not None:
                    f = r["stored_bytes"] / base["stored_bytes"]
                    out.append((f"{s['set']}: lossless update {f:.2%} of a baseline (bar: <= 10%)",
                                f <= 0.10))  # fmt: skip
            else:
                r = _row(s, "mmcore update, tolerance 0.0001")
                if r is not None and r.get("metric") is not None:
                    f = r["stored_bytes"] / base["stored_bytes"]
                    d = r["metric"] - s["metric_original"]
                    out.append((f"{s['set']}: update at 1e-4 {f:.2%} of a baseline (bar: <= 35%), "
                                f"top-1 change {d:+.2f} points (bar: under 0.5)",
                                f <= 0.35 and abs(d) < 0.5))  # fmt: skip
    for s in res.get("sets", []):
        enc = s.get("encoder")
        if enc and "zipnn" in enc:
            m, z = enc["mmcore"], enc["zipnn"]
            out.append((f"{s['set']}: XOR deltas, mmcore {m['ratio']:.1%} at {m['gbps']:.2f} GB/s, "
                        f"ZipNN {z['ratio']:.1%} at {z['gbps']:.2f} GB/s (bar: smaller, faster)",
                        m["ratio"] <= z["ratio"] and m["gbps"] > z["gbps"]))  # fmt: skip
    return out


# -- plots -----------------------------------------------------------------------------------


def _seconds(v: float, _pos: object = None) -> str:
    if v >= 1:
        return f"{v:g} s"
    return f"{v * 1e3:g} ms"


def _bytes_tick(v: float, _pos: object = None) -> str:
    return "0" if v == 0 else human_bytes(v).replace(".0 ", " ")  # 150 MB, not 150.0 MB


def _bytes_axis(ax: Any, values: list[float], *, horizontal: bool) -> None:
    """A linear axis from 0 in human units, a few ticks, room for the bar labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis = ax.xaxis if horizontal else ax.yaxis
    axis.set_major_locator(MaxNLocator(nbins=5))
    axis.set_major_formatter(FuncFormatter(_bytes_tick))
    top = max(values, default=0) or 1
    (ax.set_xlim if horizontal else ax.set_ylim)(0, top * (1.3 if horizontal else 1.1))


def _seconds_axis(ax: Any, values: list[float]) -> None:
    """A log axis of seconds, labelled at 1-2-5 steps where it spans under two decades
    (a lone decade label says little) and at the decades only where it spans more."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    positive = [v for v in values if v > 0]
    narrow = bool(positive) and max(positive) / min(positive) < 100
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(_seconds))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _title(res: dict[str, Any], tag: str) -> str:
    m = res["machine"]
    where = f"GPU {m['gpu']}" if m.get("gpu") else m["cpu"]
    return (f"{TITLES[res['part']]}: {tag} ({res['config']['name']} configuration), "
            f"{res['date'][:10]}; {where}")  # fmt: skip


def _plot_sets(res: dict[str, Any], plt: Any) -> Any:
    sets = res["sets"]
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 0.32 * sum(len(s["rows"]) + 4
                                                                    for s in sets) + 1.5),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [len(s["rows"]) + 2 for s in sets]})  # fmt: skip
    for (ax_b, ax_t), s in zip(axes, sets):
        rows = [r for r in s["rows"] if "failed" not in r]
        ys = list(range(len(rows)))
        stored = [r["stored_bytes"] for r in rows]
        ax_b.barh(ys, stored, color="tab:blue")
        for y, v in zip(ys, stored):
            ax_b.annotate(human_bytes(v), (v, y), xytext=(3, 0), textcoords="offset points",
                          va="center", fontsize=7)  # fmt: skip
        _bytes_axis(ax_b, stored, horizontal=True)
        ax_b.set_yticks(ys, [r["method"] for r in rows], fontsize=8)
        ax_b.invert_yaxis()  # the table's order, top down
        ax_b.set_title(f"{s['set']} ({s['models']:,} models, {human_bytes(s['logical_bytes'])}):"
                       " stored bytes", fontsize=9, loc="left")  # fmt: skip
        ax_b.set_xlabel("stored bytes (linear, from 0)", fontsize=8)
        ax_t.barh([y - 0.2 for y in ys], [r["save_s"]["median"] for r in rows], height=0.4,
                  label="save")  # fmt: skip
        ax_t.barh([y + 0.2 for y in ys], [r["recover_s"]["median"] for r in rows], height=0.4,
                  label="recover the set")  # fmt: skip
        _seconds_axis(ax_t, [r[k]["median"] for r in rows for k in ("save_s", "recover_s")])
        ax_t.set_yticks(ys, [""] * len(rows))
        ax_t.set_ylim(ax_b.get_ylim())
        ax_t.set_title("time, median of the runs", fontsize=9, loc="left")
        ax_t.set_xlabel("seconds (log scale)", fontsize=8)
        for ax in (ax_b, ax_t):
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(True, axis="x", alpha=0.3)
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _plot_scale(res: dict[str, Any], plt: Any) -> Any:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    methods = [r["method"] for r in res["points"][0]["rows"]]
    cells = [p["cells"] for p in res["points"]]
    meta_values: list[float] = []
    for method in methods:
        pts = [(p["cells"], r) for p in res["points"] for r in p["rows"]
               if r["method"] == method and "failed" not in r]  # fmt: skip
        xs = [n for n, _ in pts]
        axes[0].plot(xs, [r["save_s"]["median"] for _, r in pts], "o-", label=method)
        axes[1].plot(xs, [r["recover_s"]["median"] for _, r in pts], "o-", label=method)
        meta = [(n, r["metadata_bytes_per_model"]) for n, r in pts]
        meta = [(n, v) for n, v in meta if v is not None]  # none for a compressor
        if meta:
            axes[2].plot([n for n, _ in meta], [v for _, v in meta], "o-", label=method)
            meta_values += [v for _, v in meta]
        else:
            axes[2].plot([], [], "o-")  # keep each method's colour the same in every panel
    for ax, title, ylabel in zip(
        axes,
        ("save the set", "recover the set", "stored bytes per model beyond its parameters"),
        ("seconds, median (log scale)", "seconds, median (log scale)", "bytes per model (from 0)"),
    ):
        ax.set_xscale("log")
        ax.set_xticks(cells, [f"{n:,}" for n in cells])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("cells in the set (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_seconds))
        ax.yaxis.set_minor_formatter(NullFormatter())
    _bytes_axis(axes[2], meta_values, horizontal=False)
    axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f} B"))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def plot(path: Path) -> Path | None:
    """Writes ``<results file>.png`` for a harness results file; returns its path, or
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = json.loads(path.read_text())
    out = path.with_suffix(".png")
    fig = _plot_scale(res, plt) if res["part"] == "scale" else _plot_sets(res, plt)
    fig.suptitle(_title(res, path.stem.rsplit("-", 1)[0]), fontsize=11)
    fig.savefig(out, dpi=90, bbox_inches="tight")  # nothing cut at the edges
    plt.close(fig)
    return out


# -- RESULTS.md ---------------------------------------------------------------------------------


TITLES = {"battery": "Battery use case", "image": "Image use case", "scale": "Scale"}
SECTIONS = {"battery": battery_section, "image": image_section, "scale": scale_section}


def harness_results(results_dir: Path) -> tuple[list[Path], list[Path]]:
    """The harness's results files in ``results_dir`` (a ``part`` of its own), in report
    order, and the other ``*.json`` there (another benchmark's ``--json``, say)."""
    ours: list[Path] = []
    others: list[Path] = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            others.append(path)
            continue
        (ours if isinstance(res, dict) and res.get("part") in SECTIONS else others).append(path)
    ours.sort(key=lambda p: (ORDER.get(p.stem.split("-")[0], 2), p.stem))
    return ours, others


def section(results_dir: Path) -> str:
    files, others = harness_results(results_dir)
    out = [BEGIN, "", "## The benchmark harness (`python -m benchmarks.run`)", ""]
    out.append(
        "Every table below is written by the command from `benchmarks/results/*.json`. Times are "
        'medians with (min-max) over the runs; "x raw rate" is the row\'s rate over the raw-bytes '
        "floor's (one write and fsync of every parameter byte, one read) in the same run, so above "
        "1.00x means faster than writing the set's raw bytes. Stored bytes are the version's own; "
        "a provenance version's dataset is shown beside it. Lossless rows are checked bit for bit; "
        "lossy rows show their tolerance, the largest error observed and the task metric of the "
        "recovered models."
    )
    out.append("")
    if others:
        names = ", ".join(f"`{p.name}`" for p in others)
        out += [f"Left out, not results of this harness: {names}.", ""]
    if not files:
        out += ["No results yet: run `python -m benchmarks.run --quick`.", "", END]
        return "\n".join(out)
    for path in files:
        res = json.loads(path.read_text())
        tag = path.stem.rsplit("-", 1)[0]
        cfg = res["config"]
        out.append(
            f"### {TITLES[res['part']]}: `{tag}` ({cfg['name']} configuration), {res['date'][:10]}"
        )
        out.append("")
        out.append(f"Machine: {_machine(res)}. Run took {res['seconds']:.0f} s.")
        out.append("")
        out += SECTIONS[res["part"]](res, tag)
        checks = bars(res)
        if checks:
            out.append("")
            out.append(
                "Bars of issue 10"
                + (" (stated for the full configuration):" if cfg["name"] != "full" else ":")
            )
            out.append("")
            out += [f"- [{'ok' if ok else 'MISSED'}] {text}" for text, ok in checks]
        out.append("")
    out.append(END)
    return "\n".join(out)


def update_results_md(results_dir: Path, results_md: Path) -> None:
    """Replaces the harness section of ``results_md`` (appended when it has none)."""
    text = results_md.read_text() if results_md.exists() else "# Measured results\n"
    new = section(results_dir)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + new + tail
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    tmp = results_md.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(results_md)


# -- reruns ---------------------------------------------------------------------------------------


def _rows_by_key(res: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    groups = res.get("sets") or [
        {"set": f"{p['cells']:,} cells", **p} for p in res.get("points", [])
    ]
    return {(s["set"], r["method"]): r for s in groups for r in s["rows"]}


def compare(old_dir: Path, new_dir: Path) -> list[str]:
    """How a rerun's results compare with an earlier run's, file by file: stored bytes
    and task metrics (deterministic: they must match), and each timing's ratio of
    medians (new / old) with the share inside the earlier run's spread widened by 25%."""
    lines = []
    for new_path in harness_results(new_dir)[0]:
        old_path = old_dir / new_path.name
        if not old_path.exists():
            continue
        old, new = (_rows_by_key(json.loads(p.read_text())) for p in (old_path, new_path))
        keys = [k for k in new if k in old and "failed" not in new[k] and "failed" not in old[k]]
        same_bytes = sum(old[k]["stored_bytes"] == new[k]["stored_bytes"] for k in keys)
        same_metric = sum(old[k].get("metric") == new[k].get("metric") for k in keys)
        ratios, inside = [], 0
        for k in keys:
            for what in ("save_s", "recover_s"):
                o, n = old[k][what], new[k][what]
                ratios.append(n["median"] / o["median"])
                inside += 0.8 * o["min"] <= n["median"] <= 1.25 * o["max"]
        ratios.sort()
        mid = ratios[len(ratios) // 2]
        lines.append(
            f"{new_path.stem}: {len(keys)} rows; stored bytes equal in {same_bytes}, task metric "
            f"equal in {same_metric}; timing medians new/old: median {mid:.2f}x, range "
            f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x, {inside} of {len(ratios)} within the earlier "
            "run's min-max widened by 25%"
        )
    return lines
