"""push and pull between stores (local and s3://, either way): only the blobs the
destination lacks travel, the copy becomes visible in one commit, and every copied
version loads bit for bit where it arrives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_sets_equal, s3_url, save_retrained, small_set

import mmcore
from mmcore.cli import main
from mmcore.errors import InvalidArgumentError, VersionNotFoundError


def _changed(models: dict[str, Any], share: float, step: int) -> dict[str, Any]:
    k = max(1, int(len(models) * share))
    return {n: ({key: t + 0.01 * step for key, t in sd.items()} if i < k else sd)
            for i, (n, sd) in enumerate(models.items())}  # fmt: skip


@pytest.fixture(params=["local->s3", "s3->local", "local->local"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def make(kind: str, name: str) -> mmcore.ModelStore:
        if kind == "local":
            return mmcore.open(tmp_path / name)
        server = request.getfixturevalue("seaweed")
        store = mmcore.open(s3_url(server), storage_options=server.options())
        store.gc_grace_s = 0.0
        return store

    a, b = request.param.split("->")
    src, dst = make(a, "src.mm"), make(b, "dst.mm")
    yield src, dst
    src.close()
    dst.close()


def test_a_push_copies_every_version_and_ref_then_only_what_is_new(pair: Any) -> None:
    src, dst = pair
    base = small_set(200, seed=1)
    v1 = src.save(base, ref="main")
    v2 = src.save(_changed(base, 0.5, 1), approach="update", parent=v1, ref="main",
                  tolerance=1e-3)  # fmt: skip
    side = src.save(small_set(5, seed=9), ref="side")
    got = src.push(dst)
    assert (got.versions, got.blobs_shared) == (3, 0)
    assert dst.refs() == src.refs() == {"main": v2, "side": side}
    for vid in (v1, v2, side):
        assert_sets_equal(dst.load(vid), src.load(vid))
        assert dst.info(vid).stored_bytes == src.info(vid).stored_bytes
    assert dst.check().problems == []
    again = src.push(dst)  # nothing new: nothing travels
    assert (again.versions, again.blobs_copied, again.bytes_copied) == (0, 0, 0)
    # a 1% update: only its delta blob travels
    v3 = src.save(_changed(src.load(v2), 0.01, 2), approach="update", parent=v2, ref="main")
    third = src.push(dst, "main")
    assert (third.versions, third.blobs_copied, third.ref, third.head) == (1, 1, "main", v3)
    assert third.bytes_copied <= 1.2 * src.info(v3).stored_bytes
    assert_sets_equal(dst.load("main"), src.load(v3))
    assert dst.load_model(v3, "cell_000")["l0.weight"].equal(
        src.load_model(v3, "cell_000")["l0.weight"]
    )
    assert dst.check().problems == []


def test_a_pushed_blob_the_destination_holds_is_referenced_not_copied(pair: Any) -> None:
    src, dst = pair
    models = small_set(30, seed=3)
    there = dst.save(models)  # the same bytes, saved on the other side
    v = src.save(models, ref="main")
    got = src.push(dst, "main")
    assert (got.blobs_copied, got.blobs_shared, got.bytes_copied) == (0, 1, 0)
    blob = dst.manifest(v).groups[0].blob
    assert dst.storage.content(blob).refs == 2
    dst.delete(there)
    dst.gc()
    assert_sets_equal(dst.load("main"), models)
    assert dst.check().problems == []


def test_a_pull_brings_a_ref_s_chain_and_its_datasets(pair: Any) -> None:
    src, dst = pair
    from mmcore.examples import battery

    cells = battery.make_cells(4)
    v1 = src.save(cells, ref="prod")
    data = battery.make_data(list(cells), rows=8, seed=2)
    dataset = src.put_dataset(data)
    v2, trained = save_retrained(src, v1, data, dataset)
    src.save(small_set(3), ref="other")  # not needed by prod: stays behind
    src.catalog.commit([("refs", b"prod", v2.encode())])  # (prod -> the provenance version)
    got = dst.pull(src, "prod")
    assert (got.versions, got.datasets) == (2, 1)
    assert dst.refs() == {"prod": v2}
    assert_sets_equal(dst.load(v2), trained)
    assert list(dst.datasets()) == [dataset]
    assert dst.check().problems == []


def test_push_and_pull_refuse_bad_input(tmp_path: Path) -> None:
    with mmcore.open(tmp_path / "a.mm") as a, mmcore.open(tmp_path / "b.mm") as b:
        a.save(small_set(2), ref="main")
        with pytest.raises(InvalidArgumentError, match="push needs a ModelStore"):
            a.push(str(tmp_path / "b.mm"))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="pull needs a ModelStore"):
            b.pull(None)  # type: ignore[arg-type]
        with pytest.raises(VersionNotFoundError, match="nope"):
            a.push(b, "nope")
        assert b.versions() == []


def test_the_cli_pushes_and_pulls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mmcore.open(tmp_path / "a.mm") as a:
        v = a.save(small_set(4), ref="main")
    assert main(["push", str(tmp_path / "a.mm"), str(tmp_path / "b.mm"), "main"]) == 0
    out = capsys.readouterr().out
    assert "copied 1 version(s)" in out and f"ref main -> {v}" in out
    assert main(["pull", str(tmp_path / "b.mm"), str(tmp_path / "c.mm")]) == 0
    with mmcore.open(tmp_path / "c.mm") as c:
        assert c.refs() == {"main": v}
        assert torch.equal(
            c.load_model(v, "cell_001")["l0.bias"], small_set(4)["cell_001"]["l0.bias"]
        )


def test_the_cli_reaches_s3_through_the_aws_variables(
    tmp_path: Path,
    seaweed: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in (("AWS_ENDPOINT_URL", seaweed.endpoint), ("AWS_ALLOW_HTTP", "true"),
                        ("AWS_REGION", "us-east-1"), ("AWS_SKIP_SIGNATURE", "true")):  # fmt: skip
        monkeypatch.setenv(name, value)
    with mmcore.open(tmp_path / "a.mm") as a:
        v = a.save(small_set(3), ref="main")
    url = s3_url(seaweed)
    assert main(["push", str(tmp_path / "a.mm"), url]) == 0
    assert main(["info", url]) == 0
    assert v in capsys.readouterr().out
    assert main(["verify", url, "main"]) == 0
    assert main(["pull", url, str(tmp_path / "b.mm"), "main"]) == 0
    with mmcore.open(tmp_path / "b.mm") as b:
        assert_sets_equal(b.load("main"), small_set(3))


def test_a_push_of_every_version_orders_a_long_chain_parents_first() -> None:
    """The order of a whole push walks parent chains in a loop: 5,000 versions deep
    (past Python's recursion limit), listed out of order, come out parents first."""
    from types import SimpleNamespace

    from mmcore.manifest import Manifest
    from mmcore.transfer import _needed

    ids = [f"{i:016x}" for i in range(5000)]
    manifests = [Manifest(id=vid, approach="baseline", created=1.0, models=[], groups=[],
                          logical_bytes=0, parent=ids[i - 1] if i else None, ref=None,
                          message=None) for i, vid in enumerate(ids)]  # fmt: skip
    shuffled = manifests[2500:] + manifests[:2500]
    src = SimpleNamespace(catalog=SimpleNamespace(
        scan=lambda cf: ((m.id.encode(), m.encode()) for m in shuffled)))  # fmt: skip
    assert [m.id for m in _needed(src, None)] == ids  # type: ignore[arg-type]
