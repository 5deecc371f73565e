"""Update versions: exact and error-bounded deltas, chains, added/removed/re-shaped
models, max_chain, corruption, and the life of update versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, assert_sets_equal, raw_bytes, small_set
from test_roundtrip import _random_bits

import mmcore
from mmcore import dtypes
from mmcore.errors import IntegrityError, InvalidArgumentError, ModelNotFoundError

Set = dict[str, dict[str, torch.Tensor]]


def _copy(models: Set) -> Set:
    return {n: {k: t.clone() for k, t in sd.items()} for n, sd in models.items()}


def _nudge(models: Set, every: int, scale: float, seed: int) -> Set:
    """A copy with every ``every``-th model's float tensors moved a little."""
    g = torch.Generator().manual_seed(seed)
    out = _copy(models)
    for i, sd in enumerate(out.values()):
        if i % every == 0:
            for t in sd.values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * scale)
    return out


@pytest.mark.parametrize("name", sorted(dtypes.BY_NAME))
def test_every_dtype_through_a_lossless_update(store: mmcore.ModelStore, name: str) -> None:
    dtype = dtypes.BY_NAME[name]
    first = {f"m{i}": {"bits": _random_bits(dtype, (7, 3), seed=i), "scalar": _random_bits(dtype, (), seed=9 + i),
                       "empty": _random_bits(dtype, (0, 4), seed=0)} for i in range(3)}  # fmt: skip
    second = _copy(first)
    second["m1"]["bits"] = _random_bits(dtype, (7, 3), seed=77)
    second["m2"]["scalar"] = _random_bits(dtype, (), seed=78)
    v1 = store.save(first)
    v2 = store.save(second, approach="update", parent=v1)
    assert_sets_equal(store.load(v2), second)
    assert_sets_equal({"m1": store.load_model(v2, "m1")}, {"m1": second["m1"]})
    same = sum(all(torch.equal(raw_bytes(first[n][k]), raw_bytes(t)) for k, t in sd.items())
               for n, sd in second.items())  # fmt: skip
    assert store.info(v2).changes["unchanged"] == same >= 1


def test_odd_tensors_and_special_values_exact(store: mmcore.ModelStore) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "a": {
            "w": torch.randn(6, 4, generator=g),
            "h": torch.randn(5, dtype=torch.float64, generator=g),
        }
    }
    base["a"]["w"][1, 1] = 0.0  # becomes -0.0: within any tolerance, but its sign is kept
    v1 = store.save(base)
    w = torch.randn(4, 6, generator=g).t()  # non-contiguous
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), -0.0, float("inf")
    new = {
        "a": {
            "w": w,
            "h": torch.tensor(
                [-0.0, float("nan"), 1e-310, -float("inf"), 3.0], dtype=torch.float64
            ),
        }
    }
    for tol in (None, 1e-3):
        v = store.save(new, approach="update", parent=v1, tolerance=tol)
        got = store.load(v)["a"]
        special = ~torch.isfinite(w) | (w == 0)
        assert torch.equal(
            got["w"][special].view(torch.int32), w[special].contiguous().view(torch.int32)
        )
        if tol is None:
            assert_bit_equal(got["w"], w)
            assert_bit_equal(got["h"], new["a"]["h"])
        else:
            finite = torch.isfinite(w)
            assert float((got["w"][finite] - w[finite]).abs().max()) <= tol


def test_lossless_chain_is_exact_and_small(store: mmcore.ModelStore) -> None:
    models = small_set(200, seed=1)
    v = store.save(models, ref="fleet")
    base_bytes = store.info(v).stored_bytes
    for step in range(6):
        models = _nudge(models, every=50, scale=1e-3, seed=step)
        # the same four models change every time: no recovery bound, to keep one chain
        v = store.save(models, approach="update", parent=v, ref="fleet", max_recovery=None)
        info = store.info(v)
        assert (
            info.depth == step + 1
            and info.changes["delta"] == 4
            and info.changes["unchanged"] == 196
        )
        assert info.stored_bytes < 0.1 * base_bytes
    assert_sets_equal(store.load("fleet"), models)
    assert store.verify(v) > 0


def test_twenty_lossy_versions_each_within_tolerance(store: mmcore.ModelStore) -> None:
    tol = 1e-3
    models = small_set(30, seed=2)
    v = store.save(models)
    saved = []
    for step in range(20):
        models = _nudge(models, every=3, scale=1e-2, seed=100 + step)
        v = store.save(models, approach="update", parent=v, tolerance=tol)
        saved.append((v, _copy(models)))
    for vid, want in saved:
        got = store.load(vid)
        for name, sd in want.items():
            for key, t in sd.items():
                assert float((got[name][key] - t).abs().max()) <= tol, (vid, name, key)


def test_tolerance_keeps_normalisation_statistics_exact(store: mmcore.ModelStore) -> None:
    """Quantizing a small running variance within an absolute tolerance can make it
    negative (a BatchNorm then gives NaN): those statistics are stored exactly."""
    bn = torch.nn.BatchNorm1d(64)
    bn.running_var.fill_(5e-5)  # smaller than the tolerance
    first = {"m": {k: t.clone() for k, t in bn.state_dict().items()}}
    v1 = store.save(first)
    second = {"m": {k: t.clone() for k, t in first["m"].items()}}
    second["m"]["running_var"] = torch.full((64,), 1e-5) + torch.rand(64) * 1e-5
    second["m"]["running_mean"] = torch.rand(64) * 1e-3
    second["m"]["weight"] = first["m"]["weight"] + torch.rand(64) * 1e-2
    v2 = store.save(second, approach="update", parent=v1, tolerance=1e-4)
    got = store.load(v2)["m"]
    assert_bit_equal(got["running_var"], second["m"]["running_var"])
    assert_bit_equal(got["running_mean"], second["m"]["running_mean"])
    assert bool((got["running_var"] > 0).all())
    err = float((got["weight"] - second["m"]["weight"]).abs().max())
    assert 0 < err <= 1e-4  # the weights are quantized


def test_added_removed_and_reshaped_models(store: mmcore.ModelStore) -> None:
    first = small_set(5)
    v1 = store.save(first)
    second = _copy(first)
    del second["cell_001"]
    second["cell_003"] = {"other": torch.arange(10, dtype=torch.int32)}  # architecture changed
    second["new_one"] = {"w": torch.randn(3, 3)}
    v2 = store.save(second, approach="update", parent=v1)
    info = store.info(v2)
    assert (info.changes["added"], info.changes["removed"], info.changes["whole"]) == (1, 1, 2)
    got = store.load(v2)
    assert list(got) == ["cell_000", "cell_002", "cell_003", "cell_004", "new_one"]
    assert_sets_equal(got, {n: second[n] for n in got})
    with pytest.raises(ModelNotFoundError, match="cell_001"):
        store.load_model(v2, "cell_001")
    assert_sets_equal(store.load(v1), first)


def test_max_chain_stores_changed_models_whole(store: mmcore.ModelStore) -> None:
    models = small_set(4)
    v = store.save(models)
    depths = []
    for step in range(5):
        models = _nudge(models, every=1, scale=1e-2, seed=step)
        v = store.save(models, approach="update", parent=v, max_chain=2, max_recovery=None)
        info = store.info(v)
        depths.append(
            (info.changes["delta"], info.changes["whole"], info.changes["max_delta_chain"])
        )
    assert depths == [(4, 0, 1), (4, 0, 2), (0, 4, 0), (4, 0, 1), (4, 0, 2)]
    assert_sets_equal(store.load(v), models)


def test_bad_update_arguments(store: mmcore.ModelStore) -> None:
    v = store.save(small_set(2))
    for kwargs, message in [({}, "pass parent="), ({"parent": v, "tolerance": -1.0}, "tolerance must be"),
                            ({"parent": v, "tolerance": "x"}, "tolerance must be a number"),
                            ({"parent": v, "max_chain": 0}, "max_chain must be"),
                            ({"parent": "nope"}, "no version or ref 'nope'")]:  # fmt: skip
        with pytest.raises(
            (InvalidArgumentError, mmcore.errors.VersionNotFoundError), match=message
        ):
            store.save(small_set(2), approach="update", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="drop parent= and tolerance="):
        store.save(small_set(2), tolerance=1e-3)
    assert len(store.versions()) == 1


def test_corrupt_delta_is_named(store_path: Path) -> None:
    models = small_set(10, seed=3)
    with mmcore.open(store_path) as s:
        v1 = s.save(models)
        new = _nudge(models, every=5, scale=1.0, seed=1)
        v2 = s.save(new, approach="update", parent=v1)
        m = s.manifest(v2)
        assert m.update is not None and m.update.delta_blob is not None
        rec = s.storage.content(m.update.delta_blob)
        pack = s.tier.path_of(rec.pack)
        from mmcore.paths.chain import delta_table

        table = delta_table(s.storage, m)
        at = table.rows[1][0] + table.rows[1][1] // 2  # the middle of cell_005's model blob
    data = bytearray(pack.read_bytes())
    data[at] ^= 0x40
    pack.write_bytes(bytes(data))
    with mmcore.open(store_path) as s:
        with pytest.raises(IntegrityError, match="cell_005"):
            s.load(v2)
        with pytest.raises(IntegrityError, match="cell_005"):
            s.verify(v2)
        assert_sets_equal({"cell_000": s.load_model(v2, "cell_000")}, {"cell_000": new["cell_000"]})


@pytest.mark.parametrize("tolerance", [None, 1e-3])
def test_device_path_code_gives_the_host_path_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: float | None
) -> None:
    """The update save's device path (diff where the hashes are, parents moved over in
    one copy, encodings back in one copy) runs here on CPU tensors: the same delta blob,
    byte for byte, as the host path, for every kind of change (xor-planes, quantized,
    raw when zstd does not pay, ints under a tolerance, added and removed models)."""
    from mmcore.paths import update

    models = small_set(24, seed=8)
    for i, sd in enumerate(models.values()):
        sd["steps"] = torch.tensor([i, 2 * i], dtype=torch.int64)
    models["cell_001"]["big"] = torch.randn(8192, generator=torch.Generator().manual_seed(4))
    new = _nudge(models, 3, 1e-2, 2)
    new["cell_001"]["big"][5] += 1.0  # one element of a large tensor: xor-planes, then zstd
    new["cell_004"]["steps"] += 1  # an int tensor changes: xor-planes even with a tolerance
    for t in new["cell_007"].values():  # noise: raw beats zstd
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(t.dtype))
    del new["cell_010"]
    new["fresh"] = _copy(small_set(1, seed=9))["cell_000"]
    keys, loaded = [], []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(update, "_work_device", lambda entries: torch.device("cpu"))
        with mmcore.open(tmp_path / f"{forced}.mm") as s:
            v1 = s.save(models)
            v2 = s.save(new, approach="update", parent=v1, tolerance=tolerance)
            m = s.manifest(v2)
            assert m.update is not None and m.update.delta_blob is not None
            assert m.update.added == ["fresh"] and m.update.removed == ["cell_010"]
            keys.append(m.update.delta_blob)
            loaded.append(s.load(v2))
    assert keys[0] == keys[1]
    with mmcore.open(tmp_path / "True.mm") as s:
        from mmcore.paths.chain import delta_table

        m = s.manifest(s.versions()[0].id)
        table = delta_table(s.storage, m)
        kinds = {e[0] for e in table.entries}
        assert {1, 2 if tolerance is None else 3} <= kinds  # raw, and xor-planes or quantized
        assert {r[6] for r in table.rows} == {0, 1}  # some blobs stored raw, some zstd
    assert list(loaded[0]) == list(loaded[1])
    for name, sd in loaded[0].items():
        for key, t in sd.items():
            assert_bit_equal(loaded[1][name][key], t)
    if tolerance is None:
        assert_sets_equal(loaded[0], new)


def test_moving_a_recovered_version_in_large_pieces_is_exact(store: mmcore.ModelStore) -> None:
    """``load(v, device=...)`` of an update version moves the recovered set per schema in
    one copy (records gathered, then viewed there); run here with the CPU as the target:
    every tensor equal, fresh memory, the version's order, quantized (loose) states too."""
    from mmcore.paths import chain

    models = small_set(30, seed=12)
    models["other"] = {"w": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    v1 = store.save(models)
    new = _nudge(models, 4, 1e-2, 5)
    del new["cell_003"]
    new["late"] = {"b": torch.ones(3, dtype=torch.bfloat16)}
    v2 = store.save(new, approach="update", parent=v1)
    v3 = store.save(_nudge(new, 5, 1e-2, 6), approach="update", parent=v2, tolerance=1e-3)
    for vid, wanted in ((v2, None), (v3, None), (v3, {"cell_005", "late", "other"})):
        want = chain.recover(store.storage, vid, wanted, verify=True)
        got = chain.recover(store.storage, vid, wanted, verify=True, device=torch.device("cpu"))
        assert list(got) == list(want)
        for name, sd in want.items():
            assert list(got[name]) == list(sd)
            for key, t in sd.items():
                assert_bit_equal(got[name][key], t)
                assert t.numel() == 0 or got[name][key].data_ptr() != t.data_ptr()  # a copy


def test_tensor_bytes_refuses_a_device_address() -> None:
    from mmcore import kernels

    with pytest.raises(
        InvalidArgumentError, match="tensor_bytes needs a CPU tensor, got one on meta"
    ):
        kernels.tensor_bytes(torch.empty(4, device="meta"))


def test_corrupt_parent_is_named_by_the_update_that_reads_it(store_path: Path) -> None:
    """An update reads back the parent models it diffs against (a few of many: one
    buffer, one hash call); a flipped byte in one of them is named, nothing is saved."""
    models = small_set(64, seed=4)
    with mmcore.open(store_path) as s:
        v1 = s.save(models)
        m = s.manifest(v1)
        rec = s.storage.content(m.groups[0].blob)
        pack = s.tier.path_of(rec.pack)
        pos = m.models.index("cell_009")
        extent, index = rec.locate(pos)
        at = extent + index * m.groups[0].schema.stride + 3
    data = bytearray(pack.read_bytes())
    data[at] ^= 0x01
    pack.write_bytes(bytes(data))
    new = _copy(models)
    for name in ("cell_002", "cell_009", "cell_040"):  # 3 of 64: read one by one
        for t in new[name].values():
            if t.is_floating_point():
                t.add_(1.0)
    with mmcore.open(store_path) as s:
        with pytest.raises(IntegrityError, match="cell_009"):
            s.save(new, approach="update", parent=v1)
        assert [i.id for i in s.versions()] == [v1]
        assert set(s.load(v1, models=["cell_002", "cell_040"])) == {"cell_002", "cell_040"}


def test_delete_and_gc_with_updates(store: mmcore.ModelStore) -> None:
    models = small_set(20)
    v1 = store.save(models)
    v2 = store.save(_nudge(models, 2, 1e-2, 0), approach="update", parent=v1)
    with pytest.raises(InvalidArgumentError, match="parent of"):
        store.delete(v1)
    store.delete(v2)
    reclaimed = store.gc()
    assert reclaimed > 0 and len(store.tier.list()) == 1
    assert_sets_equal(store.load(v1), models)


def test_update_metadata_scales_with_the_change(store: mmcore.ModelStore) -> None:
    models = small_set(2000, seed=4)
    v1 = store.save(models)
    one_pct = _nudge(models, every=100, scale=1e-3, seed=5)
    v2 = store.save(one_pct, approach="update", parent=v1)
    info = store.info(v2)
    manifest_bytes = len(store.catalog.get("manifests", v2.encode()) or b"")
    assert info.changes["delta"] == 20
    assert manifest_bytes < 2000  # the 1,980 unchanged names are not restated
    assert info.changes["metadata_bytes"] < 20 * (4 * 24 + 4 * 32 + 40) + 64
    got = store.load(v2)
    assert_sets_equal(got, one_pct)


def test_cli_info_of_an_update(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmcore.cli import main

    models = small_set(50)
    with mmcore.open(store_path) as s:
        v1 = s.save(models)
        v2 = s.save(
            _nudge(models, 10, 1e-2, 0), approach="update", parent=v1, tolerance=1e-3, ref="fleet"
        )
    assert main(["info", str(store_path), "fleet"]) == 0
    out = capsys.readouterr().out
    assert f"version    {v2}" in out and "approach   update" in out and "tolerance  0.001" in out
    assert "changes    45 unchanged, 5 as deltas, 0 whole (0 added), 0 removed" in out
    assert (
        "depth      1 (versions back to the baseline; deltas per model at most 16, here 1)" in out
    )
    assert main(["verify", str(store_path), v2]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("nvcomp", [False, True], ids=["host-zstd", "nvcomp"])
def test_update_saved_from_the_gpu_equals_the_cpu_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nvcomp: bool
) -> None:
    """The same encodings, tables and hashes from the GPU as from the CPU. Compressed on
    the host (no nvCOMP), the delta blob is the same bytes, so the same key; compressed
    by nvCOMP on the device, each model blob is nvCOMP's zstd frames (codec ZSTD_FRAMES:
    other bytes, another stored size), so the tables agree in every other field."""
    from mmcore import codec
    from mmcore.codec import frames
    from mmcore.paths.chain import delta_table

    if nvcomp and not frames.nvcomp_available():
        pytest.skip("nvCOMP is not installed (pip install mmcore-models[gpu])")
    if not nvcomp:
        monkeypatch.setattr(frames, "nvcomp_available", lambda: False)
    models = small_set(40, seed=6)
    new = _nudge(models, 4, 1e-2, 1)
    keys, tables = [], []
    for device in ("cpu", "cuda"):
        on = {n: {k: t.to(device) for k, t in sd.items()} for n, sd in new.items()}
        with mmcore.open(tmp_path / f"{device}.mm") as s:
            v1 = s.save(models)
            v2 = s.save(on, approach="update", parent=v1, tolerance=1e-3)
            m = s.manifest(v2)
            assert m.update is not None and m.update.delta_blob is not None
            keys.append(m.update.delta_blob)
            table = delta_table(s.storage, m)
            tables.append(([row[2:-1] for row in table.rows], table.columns, table.hashes))
            gpu_frames = device == "cuda" and nvcomp
            assert {row[-1] for row in table.rows} == {
                codec.ZSTD_FRAMES if gpu_frames else codec.ZSTD
            }
            got_cpu = s.load(v2)
            got_gpu = s.load(v2, device="cuda")
            for name, sd in got_cpu.items():
                for key, t in sd.items():
                    assert got_gpu[name][key].is_cuda
                    assert_bit_equal(got_gpu[name][key].cpu(), t)
    (rows_cpu, cols_cpu, hashes_cpu), (rows_gpu, cols_gpu, hashes_gpu) = tables
    assert torch.equal(cols_cpu, cols_gpu) and torch.equal(hashes_cpu, hashes_gpu)
    assert rows_cpu == rows_gpu  # (offset, stored, codec) apart: plain size, tensors, depth
    if not nvcomp:  # the key: the tables (stored sizes included) and the hashes
        assert keys[0] == keys[1]


@pytest.mark.parametrize("name", sorted(dtypes.BY_NAME))
def test_every_dtype_through_a_lossy_update(store: mmcore.ModelStore, name: str) -> None:
    """Float kinds the quantizer knows come back within tolerance; every other dtype exact."""
    from mmcore.kernels.delta import FLOAT_KINDS

    dtype = dtypes.BY_NAME[name]
    first = {"m": {"w": _random_bits(dtype, (5, 4), seed=1), "s": _random_bits(dtype, (), seed=2)}}
    if dtype in FLOAT_KINDS:  # finite values, so the bound applies everywhere
        first = {"m": {"w": torch.randn(5, 4).to(dtype), "s": torch.randn(()).to(dtype)}}
    second = _copy(first)
    for key, t in second["m"].items():
        second["m"][key] = (
            (t.float() + 0.01).to(dtype)
            if dtype in FLOAT_KINDS
            else _random_bits(dtype, tuple(t.shape), 9)
        )
    v1 = store.save(first)
    v2 = store.save(second, approach="update", parent=v1, tolerance=0.05)
    got = store.load(v2)["m"]
    for key, want in second["m"].items():
        if dtype in FLOAT_KINDS:
            assert float((got[key].double() - want.double()).abs().max()) <= 0.05
        else:
            assert_bit_equal(got[key], want)


def test_models_without_tensors_and_an_all_unchanged_update(store: mmcore.ModelStore) -> None:
    first = {"empty": {}, **small_set(3)}
    v1 = store.save(first)
    v2 = store.save({**first, "also_empty": {}}, approach="update", parent=v1)
    assert list(store.load(v2)) == ["empty", "cell_000", "cell_001", "cell_002", "also_empty"]
    packs = store.tier.list()
    v3 = store.save({**first, "also_empty": {}}, approach="update", parent=v2)
    info = store.info(v3)
    assert info.changes["unchanged"] == 5 and info.changes["payload_bytes"] == 0
    assert store.tier.list() == packs  # v3 kept no pack of its own
    assert_sets_equal(store.load(v3), {**first, "also_empty": {}})


def test_identical_updates_share_their_delta_blob(store: mmcore.ModelStore) -> None:
    models = small_set(10)
    v1 = store.save(models)
    new = _nudge(models, 2, 1e-2, 3)
    a = store.save(new, approach="update", parent=v1)
    b = store.save(new, approach="update", parent=v1)
    ma, mb = store.manifest(a), store.manifest(b)
    assert (
        ma.update is not None
        and mb.update is not None
        and ma.update.delta_blob == mb.update.delta_blob
    )
    store.delete(a)
    assert_sets_equal(store.load(b), new)
    store.gc()
    assert_sets_equal(store.load(b), new)
    assert store.verify(b) > 0


@pytest.mark.parametrize("tolerance", [None, 1e-3])
def test_blobs_compressed_where_they_were_encoded_load_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: float | None
) -> None:
    """The GPU path's model blobs: encodings kept where they were made, each model's
    blob gathered there and compressed as 64 KiB zstd frames (codec 2). Run here with
    the CPU as the device and compress_cpu (the same format nvCOMP writes) as the
    compressor; a fresh process with no such compressor then loads the version, bit
    for bit as the host path's."""
    import subprocess
    import sys

    from mmcore.codec import frames
    from mmcore.paths import update

    models = small_set(12, seed=5)
    models["cell_001"]["big"] = torch.randn(300_000, generator=torch.Generator().manual_seed(1))
    new = _nudge(models, 2, 1e-2, 3)
    new["cell_001"]["big"][::50] += 1.0  # a blob of many frames
    with mmcore.open(tmp_path / "host.mm") as s:
        want = s.load(s.save(new, approach="update", parent=s.save(models), tolerance=tolerance))
    monkeypatch.setattr(update, "_work_device", lambda entries: torch.device("cpu"))
    monkeypatch.setattr(frames, "for_device", lambda device: frames.compress_cpu)
    with mmcore.open(tmp_path / "dev.mm") as s:
        v2 = s.save(new, approach="update", parent=s.save(models), tolerance=tolerance)
        from mmcore.paths.chain import delta_table

        table = delta_table(s.storage, s.manifest(v2))
        assert 2 in {r[6] for r in table.rows} and 1 not in {r[6] for r in table.rows}
        big = max(table.rows, key=lambda r: r[2])
        assert big[2] > 4 * frames.CHUNK  # several frames in one blob
        got = s.load(v2)
    for name, sd in want.items():
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)
    check = (
        "import mmcore, sys, torch\n"
        "with mmcore.open(sys.argv[1]) as s:\n"
        "    s.verify(sys.argv[2])\n"
        "    torch.save(s.load(sys.argv[2]), sys.argv[3])\n"
    )
    args = [sys.executable, "-c", check, str(tmp_path / "dev.mm"), v2, str(tmp_path / "fresh.pt")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fresh = torch.load(tmp_path / "fresh.pt")
    assert list(fresh) == list(want)
    for name, sd in want.items():
        for key, t in sd.items():
            assert_bit_equal(fresh[name][key], t)


def test_many_blobs_stored_plain_keep_their_unchanged_tensors(tmp_path: Path) -> None:
    """Tiny models where zstd never pays: every changed model's blob is its changed
    tensors as they are (gathered for all blobs by one native call), beside entries of
    unchanged tensors; the update loads bit-exact, whole and model by model."""
    g = torch.Generator().manual_seed(11)
    models = {
        f"m{i:03d}": {f"t{j}": torch.rand(3, generator=g) for j in range(5)} for i in range(60)
    }
    new = _copy(models)
    for i, sd in enumerate(new.values()):
        if i % 2:
            sd["t0"] = torch.rand(3, generator=g)
            sd["t3"] = torch.rand(3, generator=g)
    with mmcore.open(tmp_path / "s.mm") as s:
        v1 = s.save(models)
        v2 = s.save(new, approach="update", parent=v1)
        from mmcore.paths.chain import delta_table

        m = s.manifest(v2)
        assert m.update is not None and len(m.update.changed) == 30
        table = delta_table(s.storage, m)
        assert {r[6] for r in table.rows} == {0}  # every blob stored plain
        assert [e[0] for e in table.entries[:5]] == [1, 0, 0, 1, 0]  # raw, same, same, raw, same
        assert_sets_equal(s.load(v2), new)
        for name in ("m001", "m002", "m059"):
            got = s.load_model(v2, name)
            for key, t in new[name].items():
                assert_bit_equal(got[key], t)
