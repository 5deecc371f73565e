"""Issue 19's exchange defects: an export never writes through a planted link or into
a file it did not create, and on any error leaves nothing and raises a typed error;
dot-named models round-trip and an export's leftovers are never imported; crafted
headers give ExchangeError naming the file; import never blocks on a FIFO."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore import exchange
from mmcore.errors import InvalidArgumentError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links and FIFOs")


def _models() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(19)
    return {
        "a": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int16)},
        "b": {"w": torch.randn(7, generator=g)},
    }


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` but the store: its bytes, or a link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.split("/")[0] == "fleet.mm":
            continue
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes().hex()
    return out


def _names(seq: list[str]) -> Iterator[str]:
    yield from seq
    n = 0
    while True:
        n += 1
        yield f".fresh-{n}.tmp"


# -- 4: the temporary file ----------------------------------------------------


def test_export_never_writes_through_a_planted_link_or_into_a_planted_file(
    store: mmcore.ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    # The names the old scheme used, and the first two the export will be given.
    (out / ".a.safetensors.partial").symlink_to(victim)
    (out / ".b.safetensors.partial").write_bytes(b"someone else's")
    (out / ".taken-1.tmp").symlink_to(victim)
    (out / ".taken-2.tmp").write_bytes(b"someone else's")
    names = _names([".taken-1.tmp", ".taken-2.tmp"])
    monkeypatch.setattr(exchange, "_temp_name", lambda: next(names), raising=False)
    before = _tree(tmp_path)
    v1 = store.save(_models())
    files = store.export(v1, out)
    assert [f.name for f in files] == ["a.safetensors", "b.safetensors"]
    after = _tree(tmp_path)
    for f in files:
        del after[str(f.relative_to(tmp_path))]
    assert after == before  # nothing written through a link, nothing truncated, nothing left
    assert_sets_equal(store.load(store.import_(out)), _models())


def test_export_fails_cleanly_when_no_temporary_name_is_free(
    store: mmcore.ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".taken.tmp").symlink_to(victim)
    monkeypatch.setattr(exchange, "_temp_name", lambda: ".taken.tmp", raising=False)
    before = _tree(tmp_path)
    v1 = store.save(_models())
    with pytest.raises(
        exchange.ExchangeError,
        match=r"cannot export into .*out: 16 temporary names in a row were taken; remove",
    ):
        store.export(v1, out)
    assert _tree(tmp_path) == before


# -- 6: dot-named models, and an export's own temporary files -----------------


def test_dot_named_models_round_trip(store: mmcore.ModelStore, tmp_path: Path) -> None:
    models = {".hidden": _models()["a"], "..two": _models()["b"], "a": _models()["a"]}
    v1 = store.save(models)
    files = store.export(v1, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in files)
    got = store.load(store.import_(tmp_path / "out"))
    assert_sets_equal(got, {n: models[n] for n in sorted(models)})


_CRASH = """
import os, sys, torch
from pathlib import Path
from mmcore import exchange
def crash(*args, **kwargs):
    os._exit(3)  # killed after the bytes are written, before the file has its name
os.link = os.replace = os.rename = crash
exchange.export_models({".dot": {"w": torch.ones(3)}}, Path(sys.argv[1]), lambda n: None)
"""


def test_what_a_crashed_export_leaves_is_never_imported(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(mmcore.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _CRASH, str(out)], env=env, timeout=120, capture_output=True
    )
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    (leftover,) = out.iterdir()
    assert leftover.name.startswith(".") and leftover.stat().st_size > 0
    models = {".dot": _models()["b"], "a": _models()["a"]}
    store.export(store.save(models), out)
    assert_sets_equal(store.load(store.import_(out)), models)


# -- 7: export errors are typed and leave nothing -----------------------------


@pytest.mark.parametrize("under", ["file", "file/sub"])
def test_export_into_a_file_or_under_one_is_refused(
    store: mmcore.ModelStore, tmp_path: Path, under: str
) -> None:
    (tmp_path / "file").write_bytes(b"mine")
    before = _tree(tmp_path)
    v1 = store.save(_models())
    with pytest.raises(
        exchange.ExchangeError,
        match=r"cannot export into .*: .*file exists and is not a directory; export into a new",
    ):
        store.export(v1, tmp_path / under)
    assert _tree(tmp_path) == before


def test_an_over_long_model_name_is_refused_before_anything_is_written(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    v1 = store.save({"a": _models()["a"], "x" * (limit - len(".safetensors") + 1): _models()["b"]})
    before = _tree(tmp_path)
    with pytest.raises(
        InvalidArgumentError,
        match=rf"model 'xxx.*' cannot be exported under its own name: {limit + 1} bytes of file "
        rf"name where the file system of .* allows {limit}; rename the model",
    ):
        store.export(v1, tmp_path / "new" / "out")
    assert _tree(tmp_path) == before


def test_a_model_name_as_long_as_the_file_system_allows_round_trips(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    models = {
        "é" * ((os.pathconf(tmp_path, "PC_NAME_MAX") - len(".safetensors")) // 2): _models()["a"]
    }
    store.export(store.save(models), tmp_path / "out")
    assert_sets_equal(store.load(store.import_(tmp_path / "out")), models)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory no file can be created in (root ignores modes: an immutable one)."""
    at = tmp_path / "locked"
    at.mkdir()
    if os.geteuid() != 0:
        at.chmod(0o555)
        try:
            yield at
        finally:
            at.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(at)], capture_output=True).returncode:
        pytest.skip("running as root where chattr +i is not available")
    try:
        yield at
    finally:
        subprocess.run(["chattr", "-i", str(at)], check=True)


@pytest.mark.parametrize("below", ["", "new/sub"])
def test_an_unwritable_directory_gives_a_typed_error(
    store: mmcore.ModelStore, tmp_path: Path, unwritable: Path, below: str
) -> None:
    v1 = store.save(_models())
    before = _tree(tmp_path)
    with pytest.raises(
        exchange.ExchangeError,
        match=r"cannot export into .*locked.*: (Operation not permitted|Permission denied).*; "
        r"export into a directory you can write to \(nothing the export wrote was left behind\)",
    ):
        store.export(v1, unwritable / below)
    assert _tree(tmp_path) == before


def test_a_failure_after_some_files_removes_them_and_the_directories_made(
    tmp_path: Path,
) -> None:
    def progress(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        exchange.export_models(_models(), tmp_path / "new" / "out", progress)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appears_during_the_export_is_kept_and_the_export_undone(
    tmp_path: Path,
) -> None:
    out = tmp_path / "new" / "out"

    def progress(n: int) -> None:  # the file of the next model appears meanwhile
        (out / "b.safetensors").write_bytes(b"mine")

    with pytest.raises(
        exchange.ExchangeError, match=r"out/b\.safetensors exists \(it appeared during the export"
    ):
        exchange.export_models(_models(), out, progress)
    assert _tree(tmp_path) == {"new": "dir", "new/out": "dir", "new/out/b.safetensors": "6d696e65"}


# -- 8: crafted headers -------------------------------------------------------


def _file(head: bytes, data: bytes = b"") -> bytearray:
    return bytearray(struct.pack("<Q", len(head)) + head + data)


def _tensor(shape: list[int]) -> bytearray:
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    return _file(json.dumps({"t": entry}).encode())


DEEP = 100_000


@pytest.mark.parametrize(
    ("buf", "problem"),
    [
        (_file(b"[" * DEEP + b"]" * DEEP), "its header is not JSON"),
        (_file(b'{"t": {"shape": ' + b"[" * DEEP + b"]" * DEEP + b"}}"), "its header is not JSON"),
        (_tensor([0, 2**64]), r"tensor 't' has shape \[0, 18446744073709551616\]"),
        (_tensor([2**63, 0]), "tensor 't' has shape"),
        (_tensor([0, 2**62, 2]), "tensor 't' has shape"),  # torch's strides overflow
        (_tensor([0, *[2**62] * 50]), "tensor 't' has shape"),
    ],
)
def test_crafted_headers_are_refused_with_a_reason(buf: bytearray, problem: str) -> None:
    with pytest.raises(
        exchange.ExchangeError, match="^f is not a readable safetensors file: " + problem
    ):
        exchange.decode_file(buf, "f")


def test_an_order_too_deep_to_parse_falls_back_to_the_headers_order() -> None:
    header = {
        "__metadata__": {exchange.ORDER_KEY: "[" * DEEP + "]" * DEEP},
        "z": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
    }
    got = exchange.decode_file(_file(json.dumps(header).encode(), b"\1\2\3"), "f")
    assert_sets_equal(
        {"m": got},
        {
            "m": {
                "z": torch.tensor([1, 2], dtype=torch.uint8),
                "a": torch.tensor([3], dtype=torch.uint8),
            }
        },
    )


def test_error_messages_quote_a_bounded_excerpt() -> None:
    key = "k" * 1_000_000
    buf = _file(
        json.dumps({key: {"dtype": "X" * 1_000_000, "shape": [], "data_offsets": [0, 0]}}).encode()
    )
    with pytest.raises(
        exchange.ExchangeError, match=r"tensor 'kkk.*' has dtype 'XXX.*', which"
    ) as err:
        exchange.decode_file(buf, "f")
    assert len(str(err.value)) < 500


def test_a_crafted_file_fails_its_import_naming_it(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    v1 = store.save(_models())
    store.export(v1, tmp_path / "out")
    (tmp_path / "out" / "zz.safetensors").write_bytes(_tensor([0, 2**64]))
    with pytest.raises(
        exchange.ExchangeError,
        match=r"out/zz\.safetensors is not a readable safetensors file: tensor 't' has shape",
    ):
        store.import_(tmp_path / "out")
    assert [v.id for v in store.versions()] == [v1]


# -- 14: only regular files are read; nothing blocks ---------------------------


def test_import_refuses_a_fifo_without_blocking(store: mmcore.ModelStore, tmp_path: Path) -> None:
    v1 = store.save(_models())
    out = tmp_path / "out"
    store.export(v1, out)
    fifo = out / "m.safetensors"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            store.import_(out)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    blocked = t.is_alive()
    while t.is_alive():  # release a reader blocked on the FIFO, so a regression fails instead
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(0.1)
    assert not blocked, "import blocked on a FIFO"
    (exc,) = raised
    assert isinstance(exc, exchange.ExchangeError), exc
    assert "m.safetensors is a FIFO: only regular files are imported" in str(exc), exc
    assert [v.id for v in store.versions()] == [v1]


def test_only_regular_files_or_links_to_them_are_imported(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    models = _models()
    store.export(store.save(models), tmp_path / "elsewhere")
    out = tmp_path / "out"
    out.mkdir()
    for name in models:  # a snapshot of links to the files, as the Hugging Face cache keeps
        (out / f"{name}.safetensors").symlink_to(tmp_path / "elsewhere" / f"{name}.safetensors")
    (out / "d.safetensors").mkdir()
    with pytest.raises(
        exchange.ExchangeError,
        match=r"out/d\.safetensors is a directory: only regular files are imported; move it out",
    ):
        store.import_(out)
    (out / "d.safetensors").rmdir()
    assert_sets_equal(store.load(store.import_(out)), models)
