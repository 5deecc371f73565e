"""SIGKILL in the middle of saving (baselines and updates): every version is whole or
absent, the store opens."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import mmcore

CHILD = textwrap.dedent("""
    import sys, time, torch, mmcore
    path, cells, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(cells * 5041, generator=g)
    shapes = [("l0.weight", (48, 5)), ("l0.bias", (48,)), ("l1.weight", (48, 48)), ("l1.bias", (48,)),
              ("l2.weight", (48, 48)), ("l2.bias", (48,)), ("l3.weight", (1, 48)), ("l3.bias", (1,))]
    with mmcore.open(path) as store:
        print("READY", flush=True)
        i = 0
        while True:
            flat[: (i % 4 + 1) * 5041 * cells // 8].add_(1.0)  # every version differs, in part
            models, off = {}, 0
            for c in range(cells):
                sd = {}
                for name, shape in shapes:
                    n = 1
                    for d in shape:
                        n *= d
                    sd[name] = flat[off:off + n].view(shape)
                    off += n
                models[f"cell_{c:05d}"] = sd
            print("SAVING", i, flush=True)
            t0 = time.perf_counter()
            head = store.refs().get("fleet")
            update = {} if head is None or i % 3 == 0 else {"approach": "update", "parent": head}
            vid = store.save(models, ref="fleet", message=str(i), **update)
            print("SAVED", vid, time.perf_counter() - t0, flush=True)
            i += 1
""")


def _check_store(path: Path, committed: set[str], checked: set[str]) -> int:
    with mmcore.open(path) as store:
        versions = {v.id for v in store.versions()}
        assert committed <= versions, "a version reported as saved was lost"
        for vid in versions - checked:
            checked.add(vid)
            assert store.verify(vid) > 0
            models = store.load(vid)
            first = models["cell_00000"]["l1.weight"]
            assert first.shape == (48, 48) and torch.isfinite(first).all()
        head = store.refs().get("fleet")
        assert head is None or head in versions
        return len(versions)


def test_sigkill_during_saves_leaves_whole_versions(tmp_path: Path) -> None:
    path = tmp_path / "crash.mm"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    committed: set[str] = set()
    checked: set[str] = set()
    durations = [0.2]  # seconds per save, as the child reports them
    kills = 0
    for round_ in range(15):
        proc = subprocess.Popen([sys.executable, str(script), str(path), "3000", str(round_)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None
        # Kill while save number `target` runs, at a random point of a typical save's
        # duration: the child's own progress lines, not wall-clock guesses, decide when,
        # so a slow or loaded machine only stretches the test.
        target = rng.randrange(3)
        lines = [proc.stdout.readline()]
        while lines[-1] and lines[-1].split() != ["SAVING", str(target)]:
            lines.append(proc.stdout.readline())
        assert lines[-1], f"the child ended early: {proc.communicate()[1]}"
        time.sleep(rng.uniform(0.0, 1.2) * sorted(durations)[len(durations) // 2])
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        kills += 1
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        saved = [line.split() for line in "".join(lines).splitlines() + out.splitlines()]
        committed |= {words[1] for words in saved if words and words[0] == "SAVED"}
        durations += [float(words[2]) for words in saved if words and words[0] == "SAVED"]
        _check_store(path, committed, checked)
    assert kills == 15
    assert len(committed) >= 5, "the child never got far enough to test anything"
    with mmcore.open(path) as store:
        store.gc()
        live = set()
        for v in store.versions():
            m = store.manifest(v.id)
            blobs = [g.blob for g in m.groups]
            if m.update is not None and m.update.delta_blob is not None:
                blobs.append(m.update.delta_blob)
            live |= {store.storage.content(b).pack for b in blobs}
        assert set(store.tier.list()) == live  # orphans of interrupted saves were reclaimed
