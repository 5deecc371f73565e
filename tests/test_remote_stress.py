"""Writers and readers at once on one s3:// store (a real SeaweedFS), each in its own
process (each reader with its own cache), for ``MMCORE_S3_STRESS_S`` seconds (default 60): every version a save returned
loads exactly, every conflict is typed, nothing visible is partial.

Each saved set is derived from its seed alone, and the seed is the version's message:
a reader checks any version it sees, bit for bit, without asking the writer."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import traceback
from typing import Any

import pytest
from conftest import s3_url

WRITERS = 2
READERS = 6


def _models(seed: int) -> dict[str, dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 3 + seed % 5
    return {f"m{i}": {"w": torch.randn(17, 5, generator=g), "b": torch.randn(5, generator=g).half(),
                      "step": torch.tensor([seed])} for i in range(n)}  # fmt: skip


def _writer(url: str, options: dict[str, Any], who: int, seconds: float, out: Any) -> None:
    import mmcore
    from mmcore.errors import ConflictError, RefConflictError

    stats = {"saved": [], "conflicts": 0, "ref_conflicts": 0, "errors": []}
    rng = random.Random(who)
    try:
        with mmcore.open(url, storage_options=options) as store:
            end = time.monotonic() + seconds
            mine: str | None = None
            i = 0
            while time.monotonic() < end:
                i += 1
                seed = who * 1_000_000 + i
                ref = "main" if rng.random() < 0.5 else f"w{who}"
                update = mine is not None and rng.random() < 0.5
                try:
                    vid = store.save(_models(seed), ref=ref, message=str(seed),
                                     approach="update" if update else "baseline",
                                     parent=mine if update else None)  # fmt: skip
                except RefConflictError as exc:
                    assert exc.head is not None and exc.ref == "main"
                    stats["ref_conflicts"] += 1
                    continue
                except ConflictError:
                    stats["conflicts"] += 1
                    continue
                mine = vid
                stats["saved"].append((vid, seed))
    except BaseException:
        stats["errors"].append(traceback.format_exc())
    out.put(("writer", who, stats))


def _reader(url: str, options: dict[str, Any], who: int, seconds: float, out: Any,
            cache: str) -> None:  # fmt: skip
    import torch

    import mmcore

    stats = {"checked": 0, "models": 0, "errors": []}
    rng = random.Random(100 + who)
    try:
        with mmcore.open(url, storage_options=options, readonly=True, cache=cache) as store:
            store.catalog.refresh_s = 0.2
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                versions = store.versions()
                if not versions:
                    time.sleep(0.1)
                    continue
                info = rng.choice(versions)
                want = _models(int(info.message or "0"))
                if rng.random() < 0.5:
                    got = store.load(info.id)
                    if list(got) != list(want):
                        raise AssertionError(f"{info.id}: models {list(got)} != {list(want)}")
                else:
                    name = rng.choice(sorted(want))
                    got = {name: store.load_model(info.id, name)}
                for name, sd in got.items():
                    for key, t in want[name].items():
                        if not torch.equal(sd[key].view(torch.uint8), t.view(torch.uint8)):
                            raise AssertionError(f"{info.id}/{name}/{key} differs")
                stats["checked"] += 1
                stats["models"] += len(got)
    except BaseException:
        stats["errors"].append(traceback.format_exc())
    out.put(("reader", who, stats))


@pytest.mark.slow
def test_writers_and_readers_in_many_processes(seaweed: Any, tmp_path: Any) -> None:
    import torch

    import mmcore

    seconds = float(os.environ.get("MMCORE_S3_STRESS_S", "60"))
    url = s3_url(seaweed)
    options = seaweed.options()
    mmcore.open(url, storage_options=options).close()  # created once, before the race
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, options, w, seconds, out)) for w in range(WRITERS)
    ]
    procs += [ctx.Process(target=_reader, args=(url, options, r, seconds, out, str(tmp_path / f"r{r}")))
              for r in range(READERS)]  # fmt: skip
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [e for _, _, st in results for e in st["errors"]]
    assert not errors, errors[0]
    writers = [st for kind, _, st in results if kind == "writer"]
    readers = [st for kind, _, st in results if kind == "reader"]
    saved = [v for st in writers for v in st["saved"]]
    assert len(saved) >= 10 and all(st["checked"] > 0 for st in readers), (writers, readers)
    with mmcore.open(url, storage_options=options, readonly=True) as store:
        listed = {i.id: i for i in store.versions()}
        assert {vid for vid, _ in saved} == set(listed)  # none lost, none partial or extra
        for vid, seed in saved:
            assert listed[vid].message == str(seed)
            got = store.load(vid)
            want = _models(seed)
            assert list(got) == list(want)
            for name, sd in want.items():
                for key, t in sd.items():
                    assert got[name][key].dtype == t.dtype
                    assert torch.equal(got[name][key].view(torch.uint8), t.view(torch.uint8))
        assert store.check().problems == []
        main = store.refs().get("main")
        assert main is None or main in listed
    print(f"\n{len(saved)} saves, {sum(st['ref_conflicts'] for st in writers)} ref conflicts, "
          f"{sum(st['conflicts'] for st in writers)} other conflicts, "
          f"{sum(st['checked'] for st in readers)} reads checked")  # fmt: skip
