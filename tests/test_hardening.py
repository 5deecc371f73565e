"""Defects found by review and by a new user's first run, each provoked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_sets_equal, small_set

import mmcore
from mmcore.cli import main
from mmcore.demo import DEMO_KEY, DEMO_VALUE
from mmcore.errors import DeviceUnavailableError, InvalidArgumentError
from mmcore.store import layout


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(5, "Input/output error")])
def test_interrupt_after_durable_commit_keeps_the_pack(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException | type
) -> None:
    """The commit reached the WAL, then the call raised: the version must stay loadable."""
    models = small_set(6)
    with mmcore.open(store_path) as store:
        real_commit = store.catalog.commit

        def commit_then_raise(*args: Any, **kwargs: Any) -> None:
            real_commit(*args, **kwargs)
            raise error

        monkeypatch.setattr(store.catalog, "commit", commit_then_raise)
        with pytest.raises(type(error) if isinstance(error, BaseException) else error):
            store.save(models, ref="fleet")
        monkeypatch.undo()
    with mmcore.open(store_path) as store:
        (info,) = store.versions()
        assert store.refs() == {"fleet": info.id}
        assert store.verify(info.id) == 24
        assert_sets_equal(store.load(info.id), models)


def test_interrupt_before_commit_leaves_nothing(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mmcore.open(store_path) as store:
        keep = store.save(small_set(2), ref="keep")

        def interrupted(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(store.catalog, "commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.save(small_set(3))
        monkeypatch.undo()
        assert [v.id for v in store.versions()] == [keep]
        store.gc()  # the unreferenced pack of the interrupted save goes
        assert len(store.tier.list()) == 1
        assert store.verify(keep) == 8


def test_new_store_is_durable_up_to_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root's entry (in its parent) and the catalog's entry (in the root) are
    fsynced after both exist, for every directory the store created."""
    synced: list[tuple[Path, bool]] = []
    real = layout.fsync_dir

    def record(path: Path) -> None:
        synced.append((Path(path), (root / "catalog").exists()))
        real(path)

    monkeypatch.setattr(layout, "fsync_dir", record)
    root = tmp_path / "new" / "deeper" / "fleet.mm"
    with mmcore.open(root):
        pass
    after_catalog = {p for p, catalog_there in synced if catalog_there}
    assert {root, root.parent, root.parent.parent, tmp_path} <= after_catalog
    synced.clear()
    with mmcore.open(root):  # reopening an existing store syncs nothing
        pass
    assert synced == []


@pytest.mark.parametrize("bad", [5, None, b"fleet", ""])
def test_log_and_delete_ref_refuse_non_strings(store: mmcore.ModelStore, bad: object) -> None:
    store.save(small_set(1), ref="fleet")
    if bad is not None:  # log(None) means "every version"
        with pytest.raises(InvalidArgumentError, match="ref must be a non-empty string"):
            store.log(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="ref must be a non-empty string"):
        store.delete_ref(bad)  # type: ignore[arg-type]
    assert list(store.refs()) == ["fleet"]


def test_log_survives_a_deleted_earlier_head(store: mmcore.ModelStore) -> None:
    v1 = store.save(small_set(1, seed=1), ref="fleet")
    v2 = store.save(small_set(1, seed=2), ref="fleet")
    v3 = store.save(small_set(1, seed=3), ref="fleet")
    store.delete(v2)
    assert [i.id for i in store.log("fleet")] == [v3]
    assert {i.id for i in store.log()} == {v1, v3}


# -- the demo never deletes what it did not create ---------------------------------


def _demo(path: Path) -> int:
    return main(["demo", "--cells", "20", "--store", str(path), "--no-compare"])


def test_demo_refuses_a_directory_of_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("precious")
    assert _demo(d) == 1
    assert "was not made by `mmcore demo`" in capsys.readouterr().err
    assert (d / "chapter1.tex").read_text() == "precious"


def test_demo_refuses_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert _demo(f) == 1
    assert "was not made by `mmcore demo`" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_demo_refuses_a_real_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prod.mm"
    with mmcore.open(path) as s:
        v = s.save(small_set(2), ref="prod")
    assert _demo(path) == 1
    assert "was not made by `mmcore demo`" in capsys.readouterr().err
    with mmcore.open(path) as s:
        assert s.refs() == {"prod": v} and s.verify(v) == 8


def test_demo_replaces_its_own_store_and_uses_empty_dirs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.mm"
    assert _demo(path) == 0
    with mmcore.open(path, readonly=True) as s:
        assert s.catalog.get("meta", DEMO_KEY) == DEMO_VALUE
        first = s.refs()["battery"]
    assert _demo(path) == 0  # its own earlier store: replaced
    with mmcore.open(path, readonly=True) as s:
        assert [v.id for v in s.versions()] == [s.refs()["battery"]] != [first]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _demo(empty) == 0
    assert "bit-exact round trip: yes" in capsys.readouterr().out


# -- devices ------------------------------------------------------------------------


def test_cuda_load_without_cuda_is_a_typed_error(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = store.save(small_set(2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (
        lambda: store.load(v, device="cuda"),
        lambda: store.load_model(v, "cell_000", device="cuda:0"),
        lambda: store.load(v, device=torch.device("cuda", 1)),
    ):
        with pytest.raises(DeviceUnavailableError, match="sees no usable CUDA device"):
            call()


def test_missing_cuda_index_is_a_typed_error(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = store.save(small_set(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceUnavailableError, match=r"'cuda:7' does not exist: .* 2 CUDA"):
        store.load(v, device="cuda:7")
    with pytest.raises(InvalidArgumentError, match="onto 'cpu' or 'cuda' devices, got 'meta'"):
        store.load(v, device="meta")


# -- the command line as a new user meets it ----------------------------------------


def test_cli_into_a_closed_pipe_ends_quietly(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        for i in range(3):
            s.save(small_set(2, seed=i), ref="fleet")
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` that has already exited: every write fails
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mmcore", "info", str(store_path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141


def test_python_dash_m_mmcore(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmcore", "--version"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mmcore {mmcore.__version__}"


@pytest.mark.parametrize("cells", ["0", "-3", "many"])
def test_demo_refuses_bad_cell_counts(
    tmp_path: Path, cells: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--cells", cells, "--store", str(tmp_path / "d.mm")])
    assert exc.value.code == 2
    assert f"expected a whole number >= 1, got '{cells}'" in capsys.readouterr().err
    assert not (tmp_path / "d.mm").exists()


def test_thousands_of_small_groups_load_within_few_descriptors(store: mmcore.ModelStore) -> None:
    """Each schema group is its own extent; mapping each would hold a descriptor apiece."""
    import resource

    models = {f"m{i}": {"w": torch.full((i + 1,), float(i))} for i in range(600)}
    v = store.save(models)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 64, hard))
    try:
        loaded = store.load(v)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert_sets_equal(loaded, models)
