"""The benchmark harness itself (benchmarks/harness/, python -m benchmarks.run): a tiny
configuration runs every part, every table row is produced, every recovery is the
set saved, the report keeps the rest of RESULTS.md and reads the committed results."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("pybamm")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root off the path
    sys.path.append(str(REPO))  # appended: the installed mmcore, already imported, stays

from benchmarks.harness import contenders, peers, report, runner  # noqa: E402

TINY = runner.CONFIGS["tiny"]
BASELINE_ROWS = {"mmcore baseline", "torch.save, file per model", "safetensors, file per model",
                 "safetensors, one file for the set", "raw bytes, one write (floor)"}  # fmt: skip
UPDATE_ROWS = BASELINE_ROWS | {"mmcore update, lossless", "mmcore update, tolerance 0.0001",
                               "mmcore provenance"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("harness")
    written = runner.run(TINY, runner.PARTS, results=root / "results", work=root / "work",
                          cache=root / "cache", device=torch.device("cpu"), log=lambda _: None)  # fmt: skip
    return {"root": root, "files": written,
            "res": {p.stem.split("-", 1)[1]: json.loads(p.read_text()) for p in written}}  # fmt: skip


def _methods(s: dict[str, Any]) -> set[str]:
    return {r["method"] for r in s["rows"]}


def test_every_part_writes_its_results_file(tiny_run: dict[str, Any]) -> None:
    assert sorted(p.name for p in tiny_run["files"]) == [
        "tiny-battery.json", "tiny-image.json", "tiny-scale.json"]  # fmt: skip
    assert not list((tiny_run["root"] / "work").iterdir())  # scratch stores removed


def test_battery_rows(tiny_run: dict[str, Any]) -> None:
    res = tiny_run["res"]["battery"]
    first, *updates = res["sets"]
    zipnn = peers.zipnn_version() is not None
    assert _methods(first) == BASELINE_ROWS | ({"ZipNN, set bytes"} if zipnn else set())
    assert [s["retrained"]["cells"] for s in updates] == [3, 12]  # 25% and 100% of 12 cells
    for s in updates:
        want = UPDATE_ROWS | (
            {"ZipNN, set bytes", "ZipNN, XOR with the parent"} if zipnn else set()
        )
        assert _methods(s) == want
        prov = next(r for r in s["rows"] if r["method"] == "mmcore provenance")
        assert prov["dataset_bytes"] > 0 and prov["stored_bytes"] < prov["dataset_bytes"]
        assert s["encoder"]["mmcore"]["ratio"] > 0
    for s in res["sets"]:
        assert s["metric_original"] > 0  # RMSE in mV of real (if tiny) models
        for r in s["rows"]:
            assert r["save_s"]["runs"] >= 1 and r["save_s"]["min"] <= r["save_s"]["median"]
            assert r["stored_bytes"] > 0
            if r["tolerance"] is None:
                assert r["exact"], r["method"]  # the recovered models are the saved ones
            else:
                assert r["within_tolerance"] and r["max_error"] <= r["tolerance"]
                assert r["metric"] is not None
    assert res["training"]["rmse_mv"]["median"] > 0


def test_image_rows(tiny_run: dict[str, Any]) -> None:
    res = tiny_run["res"]["image"]
    assert [(s["arch"], s["mode"]) for s in res["sets"]] == [
        ("resnet18", "head"), ("resnet18", "all")]  # fmt: skip
    for s in res["sets"]:
        assert _methods(s) >= UPDATE_ROWS
        assert all(r["exact"] for r in s["rows"] if r["tolerance"] is None)
        assert 0 <= s["metric_original"] <= 100
    head = res["sets"][0]
    base = next(r for r in head["rows"] if r["method"] == "mmcore baseline")
    upd = next(r for r in head["rows"] if r["method"] == "mmcore update, lossless")
    assert upd["stored_bytes"] < 0.2 * base["stored_bytes"]  # only the heads changed


def test_scale_rows(tiny_run: dict[str, Any]) -> None:
    res = tiny_run["res"]["scale"]
    assert [p["cells"] for p in res["points"]] == [8, 16]
    for p in res["points"]:
        mm = next(r for r in p["rows"] if r["method"] == "mmcore baseline")
        assert mm["metadata_bytes_per_model"] > 0
        assert {"raw bytes, one write (floor)", "torch.save, file per model"} <= _methods(p)


def test_report_tables_plots_and_the_rest_of_results_md(
    tiny_run: dict[str, Any], tmp_path: Path
) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# Measured results\n\nkept above\n")
    report.update_results_md(tiny_run["root"] / "results", md)
    first = md.read_text()
    assert first.startswith("# Measured results\n\nkept above\n")
    assert first.count(report.BEGIN) == 1 and first.count(report.END) == 1
    for title in ("Battery use case: `tiny`", "Image use case: `tiny`", "Scale: `tiny`"):
        assert title in first
    assert "| mmcore update, tolerance 0.0001 |" in first
    md.write_text(first + "\nkept below\n")
    report.update_results_md(tiny_run["root"] / "results", md)  # replaced, not appended
    again = md.read_text()
    assert again.count(report.BEGIN) == 1 and again.endswith("kept below\n")
    pytest.importorskip("matplotlib")
    for path in tiny_run["files"]:
        png = report.plot(path)
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_catches_a_changed_model() -> None:
    saved = {"m": {"w": torch.ones(4), "i": torch.arange(3)}}
    assert contenders.check(saved, {"m": {"w": torch.ones(4), "i": torch.arange(3)}}).exact
    bad = contenders.check(saved, {"m": {"w": torch.tensor([1, 1, 1.5, 1]), "i": torch.arange(3)}})
    assert not bad.exact and bad.max_error == 0.5
    neg_zero = contenders.check({"m": {"w": torch.zeros(1)}}, {"m": {"w": -torch.zeros(1)}})
    assert not neg_zero.exact  # bit for bit, not ==
    raw = peers.set_bytes(saved)
    assert contenders.check(saved, raw.clone()).exact
    raw[0] ^= 1
    assert not contenders.check(saved, raw).exact


def test_without_zipnn_its_rows_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(peers, "zipnn_version", lambda: None)
    sds = {f"m{i}": {"w": torch.randn(8, 8)} for i in range(3)}
    parent = {n: {"w": sd["w"] + 1} for n, sd in sds.items()}
    res = runner.compare(TINY, tmp_path, "a set", sds, parent=parent, recipe=None, metric=None,
                          per_model_files=False, device=torch.device("cpu"), log=lambda _: None)  # fmt: skip
    assert not any("ZipNN" in m for m in _methods(res))
    assert any("ZipNN rows skipped" in n for n in res["notes"])
    assert any("one-file-per-model peers not run" in n for n in res["notes"])
    assert "zipnn" not in res["encoder"]


def test_zipnn_peer_round_trips_although_it_rewrites_its_input(tmp_path: Path) -> None:
    pytest.importorskip("zipnn")
    sds = {"a": {"w": torch.randn(1000)}, "b": {"w": torch.randn(1000)}}
    c = contenders.ZipNNSave(tmp_path / "z", sds)
    c.reset()
    c.save(sds)
    assert contenders.check(sds, c.recover()).exact
    assert torch.equal(c.recover_one("b"), sds["b"]["w"].view(torch.uint8))


def test_command_rejects_an_unknown_part() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--parts", "battery,nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown part(s) nope; the parts are battery, image, scale" in proc.stderr


def test_own_architectures_have_torchvisions_parameter_counts() -> None:
    from benchmarks.harness import vision

    assert vision.check_param_counts() == vision.TORCHVISION_PARAMS
    keys = list(vision.resnet50(10).state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer1.0.downsample.0.weight" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    assert list(vision.mobilenet_v2(10).state_dict())[-2:] == [
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    with pytest.raises(ValueError, match="resnet18"):
        vision.build("vgg16")


def test_frozen_backbone_fine_tune_changes_only_the_head() -> None:
    from benchmarks.harness import vision

    data = vision.digits(size=8, seed=0)
    base = vision.train_base("resnet18", data, steps=1, seed=0)
    tuned = vision.fine_tune("resnet18", base, vision.task(data, 1), mode="head", steps=2, seed=0)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="mode"):
        vision.fine_tune("resnet18", base, data, mode="some", steps=1, seed=0)


def test_cell_data_differs_per_cell_and_is_cached(tmp_path: Path) -> None:
    from benchmarks.harness import cells

    names = [f"cell_{i}" for i in range(4)]
    a = cells.cell_data(names, distinct=2, aged=False, seed=0, cache_dir=tmp_path)
    assert [p.name.startswith("cells-v") for p in tmp_path.iterdir()] == [True]
    b = cells.cell_data(names, distinct=2, aged=False, seed=0, cache_dir=tmp_path)  # from the cache
    for n in names:
        assert a[n]["x"].shape == (cells.ROWS, 5) and a[n]["y"].shape == (cells.ROWS, 1)
        assert torch.equal(a[n]["x"], b[n]["x"]) and torch.equal(a[n]["y"], b[n]["y"])
    # cell 2 is simulated cell 0 again, with its own sensor errors and noise
    assert not torch.equal(a["cell_0"]["y"], a["cell_2"]["y"])
    aged = cells.cell_data(names, distinct=2, aged=True, seed=1, cache_dir=tmp_path)
    assert not torch.equal(aged["cell_0"]["y"], a["cell_0"]["y"])


def test_compare_a_rerun(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    results = tiny_run["root"] / "results"
    same = report.compare(results, results)
    assert len(same) == 3 and all("within the earlier run's min-max" in line for line in same)
    assert all("median 1.00x" in line for line in same)
    slower = tmp_path / "slower"
    slower.mkdir()
    res = json.loads((results / "tiny-scale.json").read_text())
    for p in res["points"]:
        for r in p["rows"]:
            r["save_s"]["median"] *= 3
            r["stored_bytes"] += 1
    (slower / "tiny-scale.json").write_text(json.dumps(res))
    (line,) = report.compare(results, slower)
    rows = sum(len(p["rows"]) for p in res["points"])
    assert f"{rows} rows; stored bytes equal in 0" in line
    assert f"{rows} of {2 * rows} within" in line  # the recoveries, not the slower saves


def test_a_failing_peer_gives_a_row_saying_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks.harness import methods

    def boom(self: Any, sds: Any) -> None:
        raise OSError("too many open files")

    monkeypatch.setattr(methods.SafetensorsOneFile, "save", boom)
    sds = {f"m{i}": {"w": torch.randn(8, 8)} for i in range(3)}
    res = runner.compare(TINY, tmp_path, "a set", sds, parent=None, recipe=None, metric=None,
                          per_model_files=False, device=torch.device("cpu"), log=lambda _: None)  # fmt: skip
    failed = next(r for r in res["rows"] if r["method"] == "safetensors, one file for the set")
    assert failed["failed"] == "OSError: too many open files"
    assert all("failed" not in r for r in res["rows"] if r is not failed)
    lines = report.set_table(res, "metric", 2)
    assert any("| failed: OSError: too many open files |" in line for line in lines)


COMMITTED = REPO / "benchmarks" / "results"


def test_report_reads_the_committed_results(tmp_path: Path) -> None:
    """The documented report step (`python -m benchmarks.run --report-only`) over the
    committed results: their files of other benchmarks (stacked-cpu.json) are named and
    left out, every harness file gets its section and its plot."""
    results = tmp_path / "results"
    shutil.copytree(COMMITTED, results)
    md = tmp_path / "RESULTS.md"
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", md)
    before = md.read_text()
    assert runner.main(["--report-only", "--results", str(results), "--results-md", str(md)]) == 0
    text = md.read_text()
    assert text.split(report.BEGIN)[0] == before.split(report.BEGIN)[0]  # the rest kept
    assert text.split(report.END)[1] == before.split(report.END)[1]
    ours, others = report.harness_results(results)
    assert others and all(json.loads(p.read_text()).get("part") is None for p in others)
    assert (
        "Left out, not results of this harness: " + ", ".join(f"`{p.name}`" for p in others) in text
    )
    for path in ours:
        res = json.loads(path.read_text())
        tag = path.stem.rsplit("-", 1)[0]
        assert f"{report.TITLES[res['part']]}: `{tag}`" in text
    if importlib.util.find_spec("matplotlib") is not None:
        for path in ours:
            assert path.with_suffix(".png").stat().st_mtime > path.stat().st_mtime
        assert not any(p.with_suffix(".png").exists() for p in others)


def test_results_md_is_the_report_of_the_committed_results() -> None:
    """RESULTS.md's harness section is what the report writes from the committed JSON
    (rerun `python -m benchmarks.run --report-only` after changing either)."""
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    assert report.section(COMMITTED) in text


def test_a_run_redraws_only_its_own_plots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    for name in ("full-scale.json", "full-scale.png", "stacked-cpu.json"):
        shutil.copy(COMMITTED / name, results / name)
    kept = (results / "full-scale.png").read_bytes()

    def fake_run(config: Any, parts: Any, *, results: Path, **_: Any) -> list[Path]:
        out = results / "tiny-scale.json"
        shutil.copy(COMMITTED / "quick-scale.json", out)
        return [out]

    monkeypatch.setattr(runner, "run", fake_run)
    md = tmp_path / "RESULTS.md"
    args = ["--parts", "scale", "--results", str(results), "--results-md", str(md)]
    assert runner.main(args) == 0
    assert (results / "tiny-scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "full-scale.png").read_bytes() == kept  # another run's plot: untouched
    assert "Scale: `tiny`" in md.read_text() and "Scale: `full`" in md.read_text()


def test_derived_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/derived.py at its smallest: three stores, every version loaded back
    exactly, the bar printed and met (the same deltas either way)."""
    from benchmarks import derived

    assert derived.main(["--arch", "resnet18", "--finetunes", "2", "--base-steps", "1",
                         "--all-steps", "1", "--repeat", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "derived update: 1.000x today's update" in out
    assert "[met] derived_from's deltas <= the same deltas as an update today" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_probe_coders_round_trip_every_bit(dtype: torch.dtype) -> None:
    """benchmarks/compress_probe.py's candidate coders (and ZipNN's wrapper) give back
    every bit: NaN payloads, -0.0, infinities, subnormals, more than one chunk."""
    from benchmarks import compress_probe as probe

    g = torch.Generator().manual_seed(0)
    data = torch.randn(probe.CHUNK + 999, generator=g).to(dtype)
    bits = data.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
    bits[:4] = torch.tensor([-1, 0x7FC0 if dtype == torch.bfloat16 else 0x7FC00001, 1, 0]).to(
        bits.dtype
    )
    data[4:8] = torch.tensor([-0.0, float("inf"), -float("inf"), 1e-40]).to(dtype)
    raw = data.view(torch.uint8).numpy().tobytes()
    for rotate in (False, True):
        encode, decode = probe.plane_coder(
            rotate, probe.zstandard.ZstdCompressionParameters.from_level(1)
        )
        blob = encode(data)
        assert decode(blob) == raw and probe.size_of(blob) < len(raw)
    zn = probe.zipnn_coder(dtype)
    if zn is not None:
        assert zn[1](zn[0](data)) == raw


def test_shared_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/shared.py at its smallest: a frozen-backbone set stored at about one
    model's bytes, every store loaded back exactly, sharing on against off."""
    from benchmarks import shared

    assert shared.main(["--arch", "resnet18", "--finetunes", "3", "--cells", "40",
                        "--base-steps", "1", "--head-steps", "1", "--repeat", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "[met] frozen-backbone set at most 1.15x one model" in out
    assert "cells, sharing on against off" in out


def test_sizes_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/sizes.py (issue 23's table) at its smallest: every store loaded back
    exactly (the compressed one too), a row per set with its load ratio."""
    from benchmarks import sizes

    assert sizes.main(["--arch", "resnet18", "--finetunes", "2", "--cells", "20",
                       "--steps", "1", "1", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "2 resnet18 fine-tunes, frozen backbone" in out and "20 battery cells" in out
    assert "(published)" in out and "load x" in out


def test_gpu_decode_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """benchmarks/gpu_decode.py at its smallest (on the CPU where no device is): the
    decoder rows, the cells' loads (every one checked bit for bit) with and without the
    decode buffers lent again, and a vision set's."""
    from benchmarks import gpu_decode

    out_json = tmp_path / "decode.json"
    assert gpu_decode.main(["--mb", "1", "--cells", "30", "--repeat", "1", "--vision",
                            "resnet18", "--finetunes", "2", "--json", str(out_json)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "load of 30 trained cells" in out and "load of 2 resnet18 fine-tunes" in out
    assert out.count("with no decode buffer lent again") == 2
    saved = json.loads(out_json.read_text())
    assert saved["load"]["models"] == 30 and saved["vision"]["models"] == 2
