"""A model-based fuzzer of the whole API: one store driven through random sequences of
every verb (baseline, update exact and at random tolerances, a lossy update followed by
an exact one, provenance with the battery trainer, save_stacked in three forms and as a
round trip of load_stacked, delete with and without cascade, delete_ref, rebase to a
baseline or onto another parent, gc with and without compaction and compression, export/import_, reopen
writable, readers alongside the writer and across its gc, a deleted version saved again)
with I/O faults injected at the k-th call of a step of the commit protocol (pack writes,
fsync, catalog commit before and after it lands, pack reads and deletes). After every
step each live version must load exactly (within tolerance for a lossy save) through
load, load_model, load(models=...) and load_stacked, check() must find no problem, and
deleted versions must be gone.

Profiles: by default a short run for CI (12 examples of 25 steps, under a minute and a half on 2
cores while nothing fails; a failure is shrunk for up to 5 minutes).
``MMCORE_FUZZ_MINUTES=20`` runs rounds of 10 examples of 50 steps until that many
minutes have passed (the last round finishes) and prints how many examples and steps
ran, the versions saved and the faults injected (``-s`` not needed; pass no
``--hypothesis-seed`` there, or every round repeats).

The model: for every live version the exact tensors it must return, in order. A lossy
update is loaded once after its save, checked within tolerance of what was saved (exact
dtypes and running statistics bit for bit), and what it returned becomes its expected
value (a child's deltas are taken against the parent as recovered). Strategies, edits,
comparisons and fault injection are in fuzz_model.py.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from fuzz_model import (
    BATTERY_KEYS,
    CELLS,
    FIRED,
    POST_COMMIT,
    TOLERANCES,
    Models,
    apply_edits,
    assert_model,
    assert_models,
    assert_within,
    clone_models,
    crash_points,
    edit,
    edits,
    idx,
    inject,
    injected,
    is_cell,
    make_set,
    same_values,
    seeds,
    set_spec,
    value_edit,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import mmcore
from mmcore.codec import records
from mmcore.errors import (
    DependentsError,
    InvalidArgumentError,
    ReadOnlyStoreError,
    VersionNotFoundError,
)
from mmcore.examples import battery
from mmcore.manifest import ContentRecord
from mmcore.paths import baseline
from mmcore.stacked import stack_sets

MINUTES = float(os.environ.get("MMCORE_FUZZ_MINUTES") or 0)
MAX_LIVE = 6  # versions at once: every step checks each of them four ways
CELL_DATA = battery.make_data(CELLS, rows=8, seed=1)
refs = st.sampled_from([None, None, "main", "side"])
picks = st.integers(0, 31)


class Counts:
    examples = 0
    steps = 0
    saved: ClassVar[collections.Counter[str]] = collections.Counter()  # versions, by approach


@dataclass
class Version:
    vid: str
    label: str  # v1, v2, ...: creation order (ids are random)
    models: Models  # what every load must return, in order
    approach: str
    parent: str | None
    # how it was saved, for saving it again once deleted (content addressing)
    redo: dict[str, Any] = field(default_factory=dict)


class ApiMachine(RuleBasedStateMachine):
    # the store: a local one, or where this makes one (an s3:// URL and its options)
    location: ClassVar[Callable[[], tuple[str, dict[str, Any]]] | None] = None

    def __init__(self) -> None:
        super().__init__()
        Counts.examples += 1
        self.tmp = Path(tempfile.mkdtemp(prefix="mmcore-fuzz-"))
        self.path: Path | str = self.tmp / "store.mm"
        self.options: dict[str, Any] | None = None
        maker = type(self).location  # (through the class: a plain function, not a method)
        if maker is not None:
            self.path, self.options = maker()
        self.store = self._open()
        self.dataset: str | None = None  # the battery cells' data, stored on first use
        self.live: dict[str, Version] = {}  # in creation order
        self.deleted: list[Version] = []
        self.refs: dict[str, str] = {}
        self.made = 0
        # loads kept from one check to the next (their decode buffers with them): a buffer
        # lent again while one of them lives would change them
        self.held: list[tuple[Models, Models, str]] = []

    def _open(self, *, readonly: bool = False) -> mmcore.ModelStore:
        store = mmcore.open(self.path, readonly=readonly, storage_options=self.options)
        store.gc_grace_s = 0.0  # (one writer: an s3:// store's gc reclaims at once too)
        return store

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------
    def _pick(self, i: int, ok: Callable[[Version], bool] = lambda v: True) -> Version | None:
        options = [v for v in self.live.values() if ok(v)]
        return options[i % len(options)] if options else None

    def _children(self, vid: str) -> list[str]:
        return [v.vid for v in self.live.values() if v.parent == vid]

    def _descendants(self, vid: str) -> list[str]:
        out = [vid]
        for v in out:
            out.extend(c for c in self._children(v) if c not in out)
        return out

    def _depth(self, v: Version) -> int:
        if v.approach == "baseline" or v.parent is None:
            return 0
        parent = self.live[v.parent]
        return 1 + (self._depth(parent) if parent.approach == v.approach else 0)

    def _on_disk_ids(self) -> set[str]:
        """The versions a fresh reader sees (after a fault, the writer's view is checked
        against the model by the invariants)."""
        with self._open(readonly=True) as reader:
            return {v.id for v in reader.versions()}

    def _save(self, crash: tuple[str, int] | None, call: Callable[[], str], *, approach: str,
              parent: str | None, given: Models, want: Models, tolerance: float | None,
              ref: str | None, redo: dict[str, Any]) -> str | None:  # fmt: skip
        """Runs a save (with a fault injected where ``crash`` says) and adds what it
        committed to the model: a failed save leaves no version, unless it failed after
        its commit (then the version is there, whole)."""
        try:
            with inject(self.store, crash) as fired:
                vid = call()
        except Exception as exc:
            injected(exc)
            new = self._on_disk_ids() - set(self.live)
            if fired.point not in POST_COMMIT:
                assert not new, f"a save that failed at {fired.point} left versions {new}"
                return None
            assert len(new) == 1, f"a save that failed after its commit left {new}"
            vid = new.pop()
        if tolerance is not None:  # the model is what recovery gives, within tolerance
            got = self.store.load(vid)
            assert_within(got, want, tolerance, f"lossy save of {vid}")
            want = clone_models(got)
        self.made += 1
        Counts.saved[approach] += 1
        groups = self.store.manifest(vid).groups
        if any(g.shared is not None for g in groups):
            Counts.saved["sharing tensors"] += 1
        if any(self.store.storage.content(g.blob).chunks is not None for g in groups):
            Counts.saved["compressed"] += 1
        self.live[vid] = Version(vid, f"v{self.made}", want, approach, parent, redo)
        if ref is not None:
            self.refs[ref] = vid
        info = self.store.info(vid)
        assert (info.approach, info.parent, info.num_models) == (approach, parent, len(want))
        if approach == "update" and parent is not None:
            self._check_changes(vid, self.live[parent].models, given)
        return vid

    def _check_changes(self, vid: str, before: Models, given: Models) -> None:
        """An update's counts: added and removed models; a model holding the parent's
        tensors (key order aside) is never stored whole."""
        changes = self.store.info(vid).changes
        added = [n for n in given if n not in before]
        removed = [n for n in before if n not in given]
        same = [n for n in given if n in before and same_values(given[n], before[n])]
        new = changes["added"] + changes.get("derived", 0)  # whole, or deltas of another
        assert (new, changes["removed"]) == (len(added), len(removed)), changes
        assert changes["unchanged"] >= len(same), (changes, same)
        bound = len(given) - len(same)  # added, reshaped or with other values
        assert changes["whole"] <= bound, (changes, same)

    def _stacked_call(self, models: Models, via: str, **kwargs: Any) -> Callable[[], str]:
        layouts = {tuple((k, t.dtype, t.shape) for k, t in sd.items()) for sd in models.values()}
        if via == "save" or (via != "stack_sets" and len(layouts) != 1):
            return lambda: self.store.save(models, **kwargs)
        if via == "stack_sets":
            return lambda: self.store.save_stacked(stack_sets(models), **kwargs)
        names = list(models)
        first = models[names[0]]
        if via == "strided":  # [N, ...] views with the model dimension last in memory
            params = {k: torch.stack([models[n][k] for n in names], dim=-1).movedim(-1, 0)
                      for k in first}  # fmt: skip
        else:
            params = {k: torch.stack([models[n][k] for n in names]) for k in first}
        return lambda: self.store.save_stacked(names, params, **kwargs)

    # -- saves -----------------------------------------------------------------
    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(spec=set_spec, ref=refs, via=st.sampled_from(["save", "stack_sets", "names"]),
          compress=st.booleans(), crash=crash_points)  # fmt: skip
    def baseline(self, spec: Any, ref: str | None, via: str, compress: bool, crash: Any) -> None:
        models = make_set(spec)
        call = self._stacked_call(models, via, ref=ref, compress=compress)
        self._save(crash, call, approach="baseline", parent=None, given=models, want=models,
                   tolerance=None, ref=ref, redo={"models": models})  # fmt: skip

    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(spec=set_spec, model=idx, copies=st.integers(1, 3), ops=st.lists(value_edit, max_size=3),
          ref=refs, compress=st.booleans(), crash=crash_points)  # fmt: skip
    def family(self, spec: Any, model: int, copies: int, ops: Any, ref: str | None,
               compress: bool, crash: Any) -> None:  # fmt: skip
        """A baseline whose models share tensors: copies of one model, some of their
        tensors then changed (stored once per distinct value, in a row blob)."""
        models = make_set(spec)
        name = list(models)[model % len(models)]
        for i in range(copies):
            models[f"{name}~{i}"] = dict(models[name])
        models = apply_edits(models, ops)
        self._save(crash, lambda: self.store.save(models, ref=ref, compress=compress), approach="baseline",
                   parent=None, given=models, want=models, tolerance=None, ref=ref,
                   redo={"models": models})  # fmt: skip

    @precondition(lambda self: len(self.live) < MAX_LIVE and self.live)
    @rule(pick=picks, ops=edits, tolerance=st.sampled_from(TOLERANCES),
          max_chain=st.sampled_from([16, 16, 1, 2]), ref=refs,
          via=st.sampled_from(["save", "save", "stack_sets", "names", "strided"]),
          compress=st.booleans(), crash=crash_points)  # fmt: skip
    def update(self, pick: int, ops: Any, tolerance: float | None, max_chain: int,
               ref: str | None, via: str, compress: bool, crash: Any) -> None:  # fmt: skip
        parent = self._pick(pick, lambda v: v.approach != "provenance")
        if parent is None:
            return
        given = apply_edits(parent.models, ops)
        self._do_update(parent, given, tolerance, max_chain, ref, via, crash, compress)

    @precondition(lambda self: len(self.live) < MAX_LIVE - 1 and self.live)
    @rule(pick=picks, model=st.integers(0, 7), scale=st.sampled_from([0.1, 1.0]), seed=seeds,
          tolerance=st.sampled_from([t for t in TOLERANCES if t]),
          more=st.lists(value_edit, max_size=2))  # fmt: skip
    def lossy_then_exact(self, pick: int, model: int, scale: float, seed: int, tolerance: float,
                         more: Any) -> None:  # fmt: skip
        """A lossy update of every tensor of a model, then an exact update of it with
        fresh values in its small tensors: the child's deltas are taken against the
        model as recovered (assembled tensor by tensor), its small random tensors are
        stored raw, back to back."""
        parent = self._pick(pick, lambda v: v.approach != "provenance")
        if parent is None:
            return
        given = apply_edits(parent.models, [("nudge_all", model, scale, seed)])
        lossy = self._do_update(parent, given, tolerance, 16, None, "save", None)
        if lossy is not None:
            child = self.live[lossy]
            given = apply_edits(child.models, [("random_small", model, seed + 1), *more])
            self._do_update(child, given, None, 16, None, "save", None)

    @precondition(lambda self: len(self.live) < MAX_LIVE and self.live)
    @rule(pick=picks, sources=st.lists(st.integers(0, 7), min_size=1, max_size=3),
          ops=st.lists(value_edit, max_size=3), others=st.lists(edit, max_size=2),
          how=st.sampled_from(["auto", "mapping", "callable"]),
          tolerance=st.sampled_from(TOLERANCES), crash=crash_points)  # fmt: skip
    def derived(self, pick: int, sources: list[int], ops: Any, others: Any, how: str,
                tolerance: float | None, crash: Any) -> None:  # fmt: skip
        """New models saved as deltas of models of the parent (``derived_from``): copies
        of some of its models, edited (or not), beside edits of the rest (a source may be
        changed or dropped in the same version)."""
        parent = self._pick(pick, lambda v: v.approach != "provenance")
        if parent is None:
            return
        names = list(parent.models)
        mapping = {f"derived{self.made}_{j}": names[i % len(names)] for j, i in enumerate(sources)}
        copies = {new: parent.models[src] for new, src in mapping.items()}
        edited = apply_edits(copies, list(ops)) if ops else clone_models(copies)
        given = apply_edits(parent.models, list(others)) if others else dict(parent.models)
        given = {n: sd for n, sd in given.items() if n not in mapping}
        given.update(edited)
        how_to = {"auto": "auto", "mapping": mapping, "callable": mapping.get}[how]
        call = lambda: self.store.save(given, approach="update", parent=parent.vid,  # noqa: E731
                                       tolerance=tolerance, derived_from=how_to)  # fmt: skip
        redo = {"models": given, "parent": parent.vid, "tolerance": tolerance, "max_chain": 16}
        vid = self._save(crash, call, approach="update", parent=parent.vid, given=given,
                         want=given, tolerance=tolerance, ref=None, redo=redo)  # fmt: skip
        if vid is not None and how != "auto":  # every new model a delta, or stored whole
            info = self.store.info(vid).changes
            assert info["derived"] + info["added"] == len(
                [n for n in given if n not in parent.models]
            )
        Counts.saved["derived"] += vid is not None

    def _do_update(self, parent: Version, given: Models, tolerance: float | None, max_chain: int,
                   ref: str | None, via: str, crash: Any, compress: bool = False) -> str | None:  # fmt: skip
        call = self._stacked_call(given, via, approach="update", parent=parent.vid,
                                  tolerance=tolerance, max_chain=max_chain, ref=ref,
                                  compress=compress)  # fmt: skip
        want = given
        redo = {"models": given, "parent": parent.vid, "tolerance": tolerance,
                "max_chain": max_chain}  # fmt: skip
        return self._save(crash, call, approach="update", parent=parent.vid, given=given,
                          want=want, tolerance=tolerance, ref=ref, redo=redo)  # fmt: skip

    @precondition(lambda self: len(self.live) < MAX_LIVE and self.live)
    @rule(pick=picks, source=picks, tolerance=st.sampled_from(TOLERANCES), ref=refs,
          crash=crash_points)  # fmt: skip
    def stacked_roundtrip(self, pick: int, source: int, tolerance: float | None,
                          ref: str | None, crash: Any) -> None:  # fmt: skip
        """save_stacked(load_stacked(v)): as a baseline, or as an update of another version.
        The stacks hold each group's tensors in the schema's order: the models saved are
        v's in that order."""
        src = self._pick(source)
        parent = self._pick(pick, lambda v: v.approach != "provenance")
        assert src is not None
        stacks = self.store.load_stacked(src.vid)
        keys = {n: list(g.params) for g in stacks.groups for n in g.names}
        order = stacks.order or list(keys)
        models = {n: {k: src.models[n][k] for k in keys[n]} for n in order}
        if parent is None or pick % 3 == 0:
            self._save(crash, lambda: self.store.save_stacked(stacks, ref=ref), approach="baseline",
                       parent=None, given=models, want=models, tolerance=None, ref=ref,
                       redo={"models": models})  # fmt: skip
            return
        call = lambda: self.store.save_stacked(stacks, approach="update", parent=parent.vid,  # noqa: E731
                                               tolerance=tolerance, ref=ref)  # fmt: skip
        self._save(crash, call, approach="update", parent=parent.vid, given=models,
                   want=models, tolerance=tolerance, ref=ref,
                   redo={"models": models, "parent": parent.vid, "tolerance": tolerance,
                         "max_chain": 16})  # fmt: skip

    @precondition(lambda self: len(self.live) < MAX_LIVE and self.live)
    @rule(pick=picks, which=st.integers(1, 7), seed=seeds, lr=st.sampled_from([0.1, 0.01]),
          parent_key_order=st.booleans(), ref=refs, crash=crash_points)  # fmt: skip
    def provenance(self, pick: int, which: int, seed: int, lr: float, parent_key_order: bool,
                   ref: str | None, crash: Any) -> None:  # fmt: skip
        """Retrains some battery models of any version with the battery trainer."""

        def cells(v: Version) -> list[str]:
            return [n for n in v.models if n in CELLS and is_cell(v.models[n])]

        parent = self._pick(pick, lambda v: bool(cells(v)))
        if parent is None:
            return
        eligible = cells(parent)
        subset = [n for i, n in enumerate(eligible) if which >> i & 1] or eligible[:1]
        before = parent.models
        params = {"lr": lr, "epochs": 1}
        trained: Models = {}
        groups: dict[tuple[str, ...], list[str]] = {}  # the trainer runs per architecture group
        for n in subset:
            groups.setdefault(tuple(before[n]), []).append(n)
        for names in groups.values():
            canonical = {n: {k: before[n][k] for k in BATTERY_KEYS} for n in names}
            trained.update(battery.train(canonical, {n: CELL_DATA[n] for n in names}, seed=seed,
                                         **params))  # fmt: skip
        given = {n: trained[n] if n in trained else before[n] for n in before}
        if parent_key_order:
            given = {n: {k: sd[k] for k in before[n]} for n, sd in given.items()}
        want = {n: {k: given[n][k] for k in sd} for n, sd in before.items()}
        if self.dataset is None:
            self.dataset = self.store.put_dataset(CELL_DATA)
        recipe = mmcore.Recipe(battery.TRAINER, data=self.dataset, params=params, seed=seed,
                               models=subset)  # fmt: skip
        call = lambda: self.store.save(given, approach="provenance", parent=parent.vid,  # noqa: E731
                                       recipe=recipe, ref=ref)  # fmt: skip
        self._save(crash, call, approach="provenance", parent=parent.vid, given=given, want=want,
                   tolerance=None, ref=ref, redo={"models": given, "parent": parent.vid,
                                                  "recipe": recipe})  # fmt: skip

    @precondition(lambda self: len(self.live) < MAX_LIVE and self.deleted)
    @rule(pick=picks, crash=crash_points)
    def resave_deleted(self, pick: int, crash: Any) -> None:
        """Saves a deleted version's set again, as it was saved (its blobs come back)."""
        options = [v for v in self.deleted if v.redo.get("parent") in (None, *self.live)]
        if not options:
            return
        old = options[pick % len(options)]
        redo = old.redo
        if "recipe" in redo:
            parent = self.live[redo["parent"]]
            call = lambda: self.store.save(redo["models"], approach="provenance",  # noqa: E731
                                           parent=parent.vid, recipe=redo["recipe"])  # fmt: skip
            self._save(crash, call, approach="provenance", parent=parent.vid, given=redo["models"],
                       want=old.models, tolerance=None, ref=None, redo=redo)  # fmt: skip
        elif redo.get("parent") is not None:
            self._do_update(self.live[redo["parent"]], redo["models"], redo["tolerance"],
                            redo["max_chain"], None, "save", crash)  # fmt: skip
        else:
            models = redo["models"]
            self._save(crash, lambda: self.store.save(models), approach="baseline", parent=None,
                       given=models, want=models, tolerance=None, ref=None, redo=redo)  # fmt: skip

    # -- delete, rebase, gc ------------------------------------------------------
    @precondition(lambda self: self.live)
    @rule(pick=picks, cascade=st.booleans(), crash=crash_points)
    def delete(self, pick: int, cascade: bool, crash: Any) -> None:
        v = self._pick(pick)
        assert v is not None
        children = self._children(v.vid)
        doomed = self._descendants(v.vid)
        heads = [r for r, h in self.refs.items() if h in doomed]
        if children and not cascade:
            with pytest.raises((DependentsError, InvalidArgumentError)) as err:
                self.store.delete(v.vid, cascade=cascade)
            if err.type is DependentsError:
                assert sorted(err.value.dependents) == sorted(children)  # type: ignore[attr-defined]
            return
        if heads:
            with pytest.raises(InvalidArgumentError, match="head of ref"):
                self.store.delete(v.vid, cascade=cascade)
            return
        try:
            with inject(self.store, crash) as fired:
                gone = self.store.delete(v.vid, cascade=cascade)
            assert sorted(gone) == sorted(doomed)
        except Exception as exc:
            injected(exc)
            left = self._on_disk_ids() & set(doomed)
            assert left in (set(), set(doomed)), f"a failed delete took {set(doomed) - left} only"
            if fired.point not in POST_COMMIT:
                assert left == set(doomed), f"a delete that failed at {fired.point} deleted"
            if left:
                return
        for vid in doomed:
            self.deleted.append(self.live.pop(vid))
        self.deleted = self.deleted[-8:]

    @precondition(lambda self: self.refs)
    @rule(pick=picks)
    def delete_ref(self, pick: int) -> None:
        name = sorted(self.refs)[pick % len(self.refs)]
        self.store.delete_ref(name)
        del self.refs[name]

    @precondition(lambda self: self.live)
    @rule(pick=picks, onto=st.integers(-1, 31), crash=crash_points)
    def rebase(self, pick: int, onto: int, crash: Any) -> None:
        """Rewrites a version as a baseline (onto < 0) or as an update of another version."""
        v = self._pick(pick)
        assert v is not None
        parent = None if onto < 0 else self._pick(onto)
        if parent is not None and (
            parent.vid in self._descendants(v.vid) or parent.approach == "provenance"
        ):
            with pytest.raises(InvalidArgumentError):
                self.store.rebase(v.vid, parent=parent.vid)
            return
        new_parent = None if parent is None else parent.vid
        old = (v.approach, v.parent)
        new = ("baseline" if new_parent is None else "update", new_parent)
        try:
            with inject(self.store, crash) as fired:
                self.store.rebase(v.vid, parent=new_parent)
        except Exception as exc:
            injected(exc)
            with self._open(readonly=True) as reader:
                info = reader.info(v.vid)
            now = (info.approach, info.parent)
            allowed = {old, new} if fired.point in POST_COMMIT else {old}
            assert now in allowed, f"a rebase that failed at {fired.point} left it {now}"
            new = now
        v.approach, v.parent = new

    @rule(compact_below=st.sampled_from([0, 0.5, 2]), compress=st.booleans(), crash=crash_points)
    def gc(self, compact_below: float, compress: bool, crash: Any) -> None:
        try:
            with inject(self.store, crash):
                assert self.store.gc(compact_below=compact_below, compress=compress) >= 0
        except Exception as exc:
            injected(exc)
            return
        referenced = {
            ContentRecord.decode(raw).pack for _, raw in self.store.catalog.scan("content")
        }
        assert set(self.store.tier.list()) == referenced, "gc left packs nothing references"

    # -- exchange, reopen --------------------------------------------------------
    @precondition(lambda self: len(self.live) < MAX_LIVE and self.live)
    @rule(pick=picks, some=st.booleans(), as_update=st.booleans(), ref=refs)
    def export_import(self, pick: int, some: bool, as_update: bool, ref: str | None) -> None:
        v = self._pick(pick)
        assert v is not None
        names = list(v.models)
        if some and len(names) > 1:
            names = names[::2]
        target = self.tmp / f"export{self.made}"
        files = self.store.export(v.vid, target, models=names)
        assert [f.name for f in files] == [n + ".safetensors" for n in names]
        order = sorted(names, key=lambda n: n + ".safetensors")  # import reads the files so
        in_files = {n: v.models[n] for n in order}
        try:
            if as_update and v.approach != "provenance":
                call = lambda: self.store.import_(target, approach="update", parent=v.vid, ref=ref)  # noqa: E731
                self._save(None, call, approach="update", parent=v.vid, given=in_files,
                           want=in_files, tolerance=None, ref=ref,
                           redo={"models": in_files, "parent": v.vid, "tolerance": None,
                                 "max_chain": 16})  # fmt: skip
            else:
                self._save(None, lambda: self.store.import_(target, ref=ref), approach="baseline",
                           parent=None, given=in_files, want=in_files, tolerance=None, ref=ref,
                           redo={"models": in_files})  # fmt: skip
        finally:
            shutil.rmtree(target, ignore_errors=True)

    @rule(readonly=st.booleans())
    def reopen(self, readonly: bool) -> None:
        """Reopens the store; or opens a reader alongside the writer, which sees every
        version and refuses every write."""
        if not readonly:
            self.store.close()
            self.store = self._open()
            return
        with self._open(readonly=True) as reader:
            self._check_store(reader)
            some = next(iter(self.live), "0000")
            for write in (lambda: reader.save({"x": {}}), lambda: reader.gc(),
                          lambda: reader.delete(some), lambda: reader.rebase(some)):  # fmt: skip
                with pytest.raises(ReadOnlyStoreError):
                    write()

    @precondition(lambda self: self.live)
    @rule()
    def reader_across_gc(self) -> None:
        """A reader opened before the writer's gc (compacting every pack) still reads."""
        with self._open(readonly=True) as reader:
            self.store.gc(compact_below=2)
            for v in self.live.values():
                assert_models(reader.load(v.vid), v.models, f"reader: {v.label} {v.vid}")

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def every_version_loads(self) -> None:
        Counts.steps += 1
        self._check_store(self.store)

    def _check_store(self, store: mmcore.ModelStore) -> None:
        for got, want, what in self.held:
            assert_models(got, want, f"{what}, held since the last check")
        self.held = []
        assert {v.id for v in store.versions()} == set(self.live)
        assert store.refs() == self.refs
        for v in self.live.values():
            what = f"{v.label} {v.vid} ({v.approach})"
            info = store.info(v.vid)
            assert (info.approach, info.parent) == (v.approach, v.parent), (what, info)
            assert info.depth == self._depth(v), f"{what}: depth {info.depth}"
            loaded = store.load(v.vid)
            assert_models(loaded, v.models, f"load {what}")
            self.held = [*self.held[-2:], (loaded, v.models, f"load {what}")]
            for name, sd in v.models.items():
                assert_model(store.load_model(v.vid, name), sd, f"load_model {what} {name!r}")
            subset = list(v.models)[::-2]
            got = store.load(v.vid, models=subset)
            assert_models(got, {n: v.models[n] for n in subset}, f"load(models=) {what}")
            self._check_stacked(store, v, what)
        report = store.check()
        assert report.problems == [], report.problems
        for old in self.deleted[-3:]:
            with pytest.raises(VersionNotFoundError):
                store.load(old.vid)

    def _check_stacked(self, store: mmcore.ModelStore, v: Version, what: str) -> None:
        """Every model once, its row of each stack exact. A stack holds its group's
        tensors in one order (the schema's) for all its models, so a model saved in
        another order is compared by tensor name."""
        ens = store.load_stacked(v.vid)
        seen: list[str] = []
        for g in ens.groups:
            for i, name in enumerate(g.names):
                want = v.models[name]
                got = {k: g.params[k][i] for k in want if k in g.params}
                assert sorted(g.params) == sorted(want), f"load_stacked {what} {name!r}: tensors"
                assert_model(got, want, f"load_stacked {what} {name!r}")
                seen.append(name)
        assert sorted(seen) == sorted(v.models), f"load_stacked {what}: models {seen}"
        got_sets = ens.state_dicts()
        assert list(got_sets) == list(v.models), f"load_stacked {what}: order {list(got_sets)}"
        for name, want in v.models.items():
            got = {k: got_sets[name][k] for k in want if k in got_sets[name]}
            assert_model(got, want, f"load_stacked(...).state_dicts() {what} {name!r}")


# CI's profile is derandomized: the same sequences every run (a red CI names a change,
# not a draw); the long profile draws new ones.
SHORT = settings(max_examples=12, stateful_step_count=25, deadline=None, database=None,
                 print_blob=True, derandomize=True, suppress_health_check=list(HealthCheck))  # fmt: skip
LONG = settings(max_examples=10, stateful_step_count=50, deadline=None, database=None,
                print_blob=True, suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.fixture(autouse=True)
def _share_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzz's tensors are small: equal ones are shared from 8 bytes on, whatever
    they save, so that every path meets groups that share tensors."""
    monkeypatch.setattr(baseline, "SHARE_MIN", 8)
    monkeypatch.setattr(baseline, "SHARE_SAVES", 0)
    monkeypatch.setattr(records, "CHUNK_BYTES", 256)  # coded groups: chunks of a few models
    monkeypatch.setattr(records, "LARGE_BYTES", 1)  # every decode buffer lent from the cache


def test_api_state_machine_on_object_storage(seaweed: Any) -> None:
    """The short profile's first examples against an s3:// store (a real SeaweedFS)."""
    from conftest import s3_url

    FIRED.clear()
    ApiMachine.location = lambda: (s3_url(seaweed), seaweed.options())
    try:
        run_state_machine_as_test(ApiMachine, settings=settings(SHORT, max_examples=6))
    finally:
        ApiMachine.location = None
    assert sum(FIRED.values()) > 0  # the faults reached the object store's paths too


def test_api_state_machine(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    Counts.examples = Counts.steps = 0
    Counts.saved.clear()
    FIRED.clear()
    try:
        if not MINUTES:
            run_state_machine_as_test(ApiMachine, settings=SHORT)
            return
        while time.monotonic() - start < MINUTES * 60:
            run_state_machine_as_test(ApiMachine, settings=LONG)
    finally:  # how much ran (CI's short profile too: a run that did little shows here)
        with capsys.disabled():
            print(f"\nmmcore API fuzz: {Counts.examples} examples, {Counts.steps} steps in "
                  f"{time.monotonic() - start:.0f} s; versions saved {dict(Counts.saved)}; "
                  f"faults injected {sum(FIRED.values())} {dict(FIRED)}", file=sys.stderr)  # fmt: skip
