"""Export to and import from .safetensors files: every dtype the format holds
round-trips bit for bit; what cannot be exported is refused before any file is
written; bad input leaves the store unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, small_set
from test_roundtrip import _random_bits

import mmcore
from mmcore import dtypes, exchange, kernels
from mmcore.errors import InvalidArgumentError, ModelNotFoundError

pytest.importorskip("safetensors.torch")


def _every_dtype_model() -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, dtype) in enumerate(sorted(dtypes.BY_NAME.items())):
        if exchange._supported(dtype):
            out[name] = _random_bits(dtype, (3, 5), seed=i)
    out["empty"] = torch.empty(0, 4)
    out["scalar"] = torch.tensor(-0.0)
    out["nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    return out


def test_export_then_import_round_trips_every_dtype_bit_for_bit(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    models = {"mixed": _every_dtype_model(), **small_set(3)}
    v1 = store.save(models)
    files = store.export(v1, tmp_path / "out")
    assert sorted(f.name for f in files) == sorted(f"{n}.safetensors" for n in models)
    v2 = store.import_(tmp_path / "out", ref="imported")
    got = store.load(v2)
    assert sorted(got) == sorted(models)
    for name, sd in models.items():
        assert list(got[name]) == list(sd)  # tensor names and their order kept
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)
    assert store.refs()["imported"] == v2


def test_import_as_an_update_of_a_parent(store: mmcore.ModelStore, tmp_path: Path) -> None:
    models = small_set(6)
    v1 = store.save(models)
    changed = {n: {k: t.clone() for k, t in sd.items()} for n, sd in models.items()}
    for t in changed["cell_002"].values():
        if t.is_floating_point():
            t.add_(0.5)
    v2 = store.save(changed)
    store.export(v2, tmp_path / "out")
    v3 = store.import_(tmp_path / "out", approach="update", parent=v1)
    info = store.info(v3)
    assert info.approach == "update" and info.changes["delta"] + info.changes["whole"] == 1
    got = store.load(v3)
    for name, sd in changed.items():
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)


def test_what_cannot_be_exported_is_refused_before_any_file(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    models = {
        "a": {"w": torch.ones(2)},
        "b": {"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex128)},
    }
    v1 = store.save(models)
    with pytest.raises(
        exchange.ExchangeError,
        match=r"model 'b', tensor 'z': safetensors cannot hold dtype torch.complex128",
    ):
        store.export(v1, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    store.export(v1, tmp_path / "out", models=["a"])
    with pytest.raises(exchange.ExchangeError, match=r"a\.safetensors exists"):
        store.export(v1, tmp_path / "out", models=["a"])
    with pytest.raises(ModelNotFoundError):
        store.export(v1, tmp_path / "other", models=["nope"])
    v2 = store.save({"x/y": {"w": torch.ones(1)}})
    with pytest.raises(InvalidArgumentError, match="cannot be exported under its own name"):
        store.export(v2, tmp_path / "slash")


def test_bad_imports_are_refused_and_the_store_is_unchanged(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    v1 = store.save(small_set(2))
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        store.import_(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"holds no \.safetensors files"):
        store.import_(tmp_path / "empty")
    store.export(v1, tmp_path / "out")
    (tmp_path / "out" / "zz_broken.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    )
    with pytest.raises(
        exchange.ExchangeError, match=r"zz_broken\.safetensors is not a readable safetensors file"
    ):
        store.import_(tmp_path / "out")
    assert [v.id for v in store.versions()] == [v1]


def test_cli_export_and_import(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmcore.cli import main

    with mmcore.open(store_path) as s:
        v1 = s.save(small_set(3))
    assert main(["export", str(store_path), v1, str(tmp_path / "out")]) == 0
    assert "exported 3 model(s)" in capsys.readouterr().out
    assert main(["import", str(store_path), str(tmp_path / "out"), "--ref", "back"]) == 0
    out = capsys.readouterr().out
    with mmcore.open(store_path, readonly=True) as s:
        v2 = s.refs()["back"]
        assert v2 in out
        for name, sd in s.load(v1).items():
            for key, t in sd.items():
                assert_bit_equal(s.load(v2)[name][key], t)
    assert main(["export", str(store_path), v1, str(tmp_path / "out")]) == 1  # files in the way
    assert "exists" in capsys.readouterr().err


def test_files_written_by_safetensors_itself_import(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    import safetensors.torch

    (tmp_path / "in").mkdir()
    want = {"b": torch.arange(4, dtype=torch.int32), "a": torch.ones(2, 2, dtype=torch.float16)}
    safetensors.torch.save_file(want, str(tmp_path / "in" / "plain.safetensors"))
    got = store.load(store.import_(tmp_path / "in"))["plain"]
    assert sorted(got) == ["a", "b"]  # the file's own order: no mmcore metadata in it
    for key, t in want.items():
        assert_bit_equal(got[key], t)


def test_our_files_are_the_packages_and_the_packages_are_ours(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    """Both directions against the safetensors package, every dtype it and torch share."""
    import safetensors.torch
    from safetensors import safe_open

    model = _every_dtype_model()
    v1 = store.save({"m": model})
    (path,) = store.export(v1, tmp_path / "out")
    theirs = safetensors.torch.load_file(str(path))
    assert sorted(theirs) == sorted(model)
    for key, t in model.items():
        assert_bit_equal(theirs[key], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()[exchange.ORDER_KEY] == '["' + '", "'.join(model) + '"]'
    blob = safetensors.torch.save(model)  # the package's own layout, read by ours
    ours = exchange.decode_file(bytearray(blob), "the package's bytes")
    for key, t in model.items():
        assert_bit_equal(ours[key], t)


def _file(
    header: dict[str, object], data: bytes = b"", *, raw_header: bytes | None = None
) -> bytearray:
    import json
    import struct

    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize(
    ("buf", "problem"),
    [
        (bytearray(b"\x01\x00"), "shorter than its 8-byte header length"),
        (bytearray(b"\xff" * 8 + b"{}"), "a header of"),
        (_file({}, raw_header=b"{nope"), "its header is not JSON"),
        (_file({}, raw_header=b"[1, 2]"), "not a JSON object"),
        (_file({"__metadata__": {"k": 1}}), "__metadata__ is not a map of strings"),
        (_file({"t": 3}), "tensor 't' is not described by a map"),
        (
            _file({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "dtype \\['F32'\\]",
        ),
        (
            _file({"t": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
            "dtype 'C128'",
        ),
        (
            _file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "has shape",
        ),
        (
            _file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
            "data_offsets",
        ),
        (
            _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "do not hold",
        ),
        (
            _file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
            "ends 2 bytes before its last tensor",
        ),
        (
            _file(
                {
                    "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                },
                b"\0" * 3,
            ),
            "must be contiguous",
        ),
        (
            _file({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 3),
            "2 bytes after the last",
        ),
    ],
)
def test_damaged_files_are_refused_with_a_reason(buf: bytearray, problem: str) -> None:
    with pytest.raises(exchange.ExchangeError, match=problem):
        exchange.decode_file(buf, "f")


def test_a_file_of_another_writer_with_misaligned_data_is_read_exactly() -> None:
    data = bytes(range(1, 9))
    buf = _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                 "f": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]},
                 "g": {"dtype": "I16", "shape": [1], "data_offsets": [5, 7]},
                 "h": {"dtype": "BOOL", "shape": [1], "data_offsets": [7, 8]}}, data)  # fmt: skip
    got = exchange.decode_file(buf, "f")
    assert (
        kernels.tensor_bytes(got["f"]) == data[1:5] and kernels.tensor_bytes(got["g"]) == data[5:7]
    )
