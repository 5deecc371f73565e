"""The public API: ``mmcore.open`` and ``ModelStore``."""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from . import _args, exchange, transfer
from ._progress import progress_bar
from .errors import (
    ConflictError,
    DependentsError,
    IntegrityError,
    InvalidArgumentError,
    InvalidModelSetError,
    MMCoreError,
    NativeModuleError,
    PackMissingError,
    ReadOnlyStoreError,
    RefNotFoundError,
    StoreError,
    decoding,
)
from .manifest import APPROACHES, ContentRecord, DatasetRecord, Manifest
from .modelset import StackedInput
from .paths import baseline, chain, load, retrain, update
from .paths.commit import Blobs, commit_version, swap_references, version_blobs
from .paths.reader import StateDict
from .recipe import Recipe
from .record import ref_target
from .stacked import Stack, StackedSet, build_modules
from .storage import Records, Storage, open_storage
from .store import compact
from .store.packs import PackWriter, PayloadTier
from .transfer import TransferReport
from .versions import VerifyReport, VersionInfo

DEFAULT_MAX_CHAIN = 16
# A model is stored whole again (a keyframe) once recovering it through its deltas
# would cost more than this many times recovering it whole (bytes read and decoded).
DEFAULT_MAX_RECOVERY = 2.0


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _refreshing(method: _Method) -> _Method:
    """A read of a read-only store that finds a pack gone (a writer's gc or compaction
    since the store was opened: the catalog it holds is older than the packs) reopens
    the catalog and runs once more against what the store holds now."""

    @functools.wraps(method)
    def run(self: ModelStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except PackMissingError:
            if not (self.readonly or self.remote) or self._closed:
                raise
            self.storage.refresh()
        return method(self, *args, **kwargs)

    return cast(_Method, run)


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    create: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> ModelStore:
    """Opens (and by default creates) the store in directory ``path``, or on S3-compatible
    object storage at ``s3://bucket/prefix`` (endpoint, region and credentials from the
    AWS_* environment variables, or ``storage_options``: endpoint, region,
    access_key_id, secret_access_key, session_token, allow_http, ...). ``cache``: a
    directory keeping what an s3:// store read, checked on every read."""
    return ModelStore(path, readonly=readonly, create=create, storage_options=storage_options,
                      cache=cache)  # fmt: skip


class ModelStore:
    """A directory holding versions of model sets. Use as a context manager.

    One process may open a local store for writing, any number read-only. A store on
    object storage (``s3://``) takes any number of writers and readers on any number
    of machines (see ``store.remote``). A ModelStore object is not thread-safe: use
    one per thread.

    The verbs check their arguments here and run over ``self.storage`` (an
    ``mmcore.storage.Storage``: the catalog and payload tier, local or on object
    storage), which the save paths and readers (``mmcore.paths``) take.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        create: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.readonly = _args.flag(readonly, "readonly")
        _args.flag(create, "create")
        self.storage: Storage = open_storage(path, readonly=self.readonly, create=create,
                                             storage_options=storage_options, cache=cache)  # fmt: skip
        self.gc_grace_s = self.storage.gc_grace_s  # see gc()

    @property
    def path(self) -> Path | str:
        return self.storage.path

    @property
    def remote(self) -> bool:
        """Whether the store is on object storage."""
        return self.storage.remote

    @property
    def catalog(self) -> Records:
        return self.storage.catalog

    @property
    def tier(self) -> PayloadTier:
        return self.storage.tier

    @property
    def _closed(self) -> bool:
        return self.storage.closed

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.path)!r}, readonly={self.readonly})"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this store is closed; open it again with mmcore.open(path)")

    # -- lookups ---------------------------------------------------------
    def resolve(self, version_or_ref: str) -> str:
        """The full version id for an id, a unique id prefix (>= 4 hex digits), or a ref."""
        self._check_open()
        return self.storage.resolve(version_or_ref)

    def manifest(self, version_or_ref: str) -> Manifest:
        self._check_open()
        return self.storage.manifest(version_or_ref)

    def refs(self) -> dict[str, str]:
        self._check_open()
        return self.storage.refs()

    # -- save ------------------------------------------------------------
    def save(
        self,
        models: Any,
        *,
        approach: str = "baseline",
        parent: str | None = None,
        ref: str | None = None,
        message: str | None = None,
        tolerance: float | None = None,
        max_chain: int = DEFAULT_MAX_CHAIN,
        max_recovery: float | None = DEFAULT_MAX_RECOVERY,
        recipe: Recipe | None = None,
        check: bool = True,
        derived_from: update.DerivedFrom = None,
        compress: bool = False,
        progress: bool | None = None,
    ) -> str:
        """Saves a model set as a new version and returns its id.

        ``models`` maps model names to ``torch.nn.Module`` objects or state dicts.
        ``approach="baseline"`` stores every parameter; ``"update"`` stores what
        changed since ``parent`` (lossless, or within ``tolerance`` of every saved
        element; normalisation statistics, tensors named ``*running_mean`` and
        ``*running_var``, stay exact: an absolute error can turn a small variance
        negative), storing a model whole (a keyframe) once its chain of deltas would
        pass ``max_chain``, or once recovering it through its deltas would cost more
        than ``max_recovery`` times recovering it whole (its base, plus the stored and
        decoded bytes of every delta since it was last whole: with the default 2.0 a
        model retrained whole is stored as a delta, then whole again; ``None``: no such
        bound). ``"provenance"`` stores how to re-create the models from
        ``parent`` instead of them: ``recipe`` (an ``mmcore.Recipe``) names a
        registered trainer, a dataset from ``put_dataset``, its parameters and seed;
        with ``check`` (default) the recipe is run on the parent first and must give
        the models passed, bit for bit. ``ref`` (optional) is moved to the new
        version in the same atomic commit.

        ``derived_from`` (an update): the models of the set that ``parent`` lacks are
        stored as deltas of the parent's model it names, not whole: a mapping {new
        model: the parent's model}, a callable (new model name -> the parent's model
        name, or None), or ``"auto"`` (the parent's model of the same architecture
        sharing the most tensor bytes with it, at least 1/16 of them, or else the only
        one of that architecture). So a family of fine-tunes is stored as deltas of its
        base; they recover, load one by one and chain (``max_chain``, ``max_recovery``)
        as any delta does.

        ``compress=True`` stores the models the version holds whole (a baseline's, an
        update's new and keyframed models) losslessly compressed: each tensor's bytes
        split into byte planes (a float's exponent apart), each plane entropy-coded
        where that is smaller (about 0.83x for trained float32 weights, 0.67x for
        bfloat16). Loads decode on every core, ``load_model`` only the chunk of about
        1 MiB holding its model. An update's deltas are compressed either way; a
        provenance version stores no tensors. Records the store holds already (equal
        models) are referenced in the form they were stored in.
        """
        self._check_open()
        if approach not in APPROACHES:
            raise InvalidArgumentError(
                f"approach must be one of {', '.join(map(repr, APPROACHES))}, got {approach!r}"
            )
        if approach == "baseline" and (parent, tolerance) != (None, None):
            raise InvalidArgumentError(
                "a baseline version stores every parameter exactly and has no parent; "
                "drop parent= and tolerance=, or save with approach='update'"
            )
        if (recipe is not None) != (approach == "provenance"):
            raise InvalidArgumentError(
                "recipe= goes with approach='provenance', and a provenance save needs one"
            )
        _args.flag(check, "check")
        _args.flag(compress, "compress")
        if derived_from is not None and approach != "update":
            raise InvalidArgumentError(
                "derived_from= pairs new models with models of the parent: it goes with "
                "approach='update' and parent="
            )
        if approach == "provenance":
            if parent is None or tolerance is not None:
                raise InvalidArgumentError(
                    "a provenance version re-creates its models from a parent: pass "
                    "parent=VERSION_OR_REF (and no tolerance=)"
                )
            parent = self.resolve(parent)
        if approach == "update":
            if parent is None:
                raise InvalidArgumentError(
                    "an update version is stored relative to a parent: pass parent=VERSION_OR_REF"
                )
            parent = self.resolve(parent)
            if self.manifest(parent).provenance is not None:
                raise InvalidArgumentError(
                    f"version {parent} is a provenance version: an update is stored against a "
                    "baseline or update version (save this set as a baseline, or update another parent)"
                )
            if tolerance is not None:
                tolerance = _args.tolerance(tolerance)
            _args.max_chain(max_chain)
            if max_recovery is not None:
                max_recovery = _args.max_recovery(max_recovery)
        if ref is not None:
            _args.ref_name(ref)
        _args.optional_text(message, "message")
        _args.optional_flag(progress, "progress")
        self._check_writable()
        vid = secrets.token_hex(8)
        while self.catalog.get("manifests", vid.encode()) is not None:  # 64 random bits; be sure
            vid = secrets.token_hex(8)
        writer = self.tier.create()
        try:
            with progress_bar(_count(models), "saving models", progress, unit="model") as bar:
                manifest = Manifest(id=vid, approach=approach, created=time.time(), models=[],
                                    groups=[], logical_bytes=0, parent=parent, ref=ref,
                                    message=message)  # fmt: skip
                blobs = self._write_payload(writer, manifest, models, tolerance=tolerance,
                                            max_chain=max_chain, max_recovery=max_recovery,
                                            recipe=recipe, check=check, progress=bar,
                                            derived_from=derived_from, compress=compress)  # fmt: skip
            pack_size = writer.finish()
        except BaseException:
            writer.abort()  # nothing references the pack yet
            raise
        commit_version(self.storage, manifest, blobs, writer.pack_id, pack_size)
        return vid

    def _write_payload(self, writer: PackWriter, manifest: Manifest, models: Any, *,
                       tolerance: float | None, max_chain: int, max_recovery: float | None,
                       recipe: Recipe | None, check: bool, progress: Any,
                       saved_orders: dict[str, list[str]] | None = None,
                       derived_from: update.DerivedFrom = None, compress: bool = False
                       ) -> Blobs:  # fmt: skip
        """Writes a version's payload by its approach into ``writer``; fills the manifest's
        models, groups and path records; returns the blobs to reference. ``saved_orders``
        (a rebase): the models come in their schemas' tensor order, kept; these are the
        orders they were saved in."""
        parent = manifest.parent
        if manifest.approach == "update":
            assert parent is not None
            with torch.no_grad():  # a module's parameters are read as they are, not detached
                up = update.write_update(self.storage, writer, models, parent, tolerance=tolerance,
                                         max_chain=max_chain, max_recovery=max_recovery,
                                         progress=progress, saved_orders=saved_orders,
                                         derived_from=derived_from, compress=compress)  # fmt: skip
            manifest.groups, manifest.update, manifest.logical_bytes = (
                up.groups,
                up.update,
                up.logical_bytes,
            )
            return up.blobs
        if manifest.approach == "provenance":
            assert parent is not None and recipe is not None
            pv = retrain.write_provenance(
                self.storage,
                writer,
                models,
                parent,
                recipe,
                check=check,
                progress=progress,
                load_parent=load.parent_loader(self.storage, parent, allow_code_change=False),
            )
            manifest.provenance, manifest.logical_bytes = pv.info, pv.logical_bytes
            return pv.blobs
        with torch.no_grad():
            written = baseline.write_set(writer, models, progress, self.storage.stored,
                                         compress=compress)  # fmt: skip
        manifest.models, manifest.groups = written.names, written.groups
        manifest.logical_bytes = written.logical_bytes
        if saved_orders is not None:
            given = {n: list(sd) for n, sd in models.items()}
            manifest.orders = {n: order for n, order in saved_orders.items() if order != given[n]}
        return list(written.blobs)

    def rebase(
        self,
        version: str,
        *,
        parent: str | None = None,
        max_recovery: float | None = DEFAULT_MAX_RECOVERY,
        compress: bool = False,
        progress: bool | None = None,
    ) -> None:
        """Rewrites a version in place (same id, same models, bit for bit) as a baseline,
        or as a lossless update of another ``parent`` (models whose recovery through
        ``parent``'s chain would pass ``max_recovery``, as in ``save``, stored whole), so
        that what it was stored against can be deleted. Versions stored against it stay
        valid: it recovers to the same bytes. Refs, ``prev`` and the message are kept;
        one atomic commit. A model derived from another (``save(derived_from=)``) stays a
        delta of its source where ``parent`` holds the source in the same layout.
        ``compress`` codes the records it writes, as ``save``'s does; bytes the store
        holds already (equal models) keep the form they were stored in."""
        self._check_writable()
        _args.flag(compress, "compress")
        _args.optional_flag(progress, "progress")
        if max_recovery is not None:
            max_recovery = _args.max_recovery(max_recovery)
        m = self.manifest(version)
        if parent is not None:
            parent = self.resolve(parent)
            up: str | None = parent
            while up is not None:  # the new parent must not be stored against this version
                if up == m.id:
                    raise InvalidArgumentError(
                        f"version {parent} depends on {m.id}: rebasing onto it would make a cycle"
                    )
                up = self.manifest(up).parent
            if self.manifest(parent).provenance is not None:
                raise InvalidArgumentError(
                    f"version {parent} is a provenance version: an update is stored against a "
                    "baseline or update version"
                )
        models = self.load(m.id)
        saved = None
        if m.provenance is None:  # keep each model's schema: versions stored against it use it
            with decoding(m.id):
                index = chain.model_index(self.storage, m.id)
            saved = {n: list(sd) for n, sd in models.items()}
            models = {n: {s.name: sd[s.name] for s in index[n].schema.tensors}
                      for n, sd in models.items()}  # fmt: skip
        derived: dict[str, str] = {}
        if parent is not None and m.update is not None and m.update.derived:
            with decoding(parent):
                onto = chain.model_index(self.storage, parent)
            derived = {name: source for name, source in m.update.derived.items()
                       if name not in onto and source in onto
                       and onto[source].schema.layout_key() == index[name].schema.layout_key()}  # fmt: skip
        new = Manifest(id=m.id, approach="update" if parent else "baseline", created=m.created,
                       models=[], groups=[], logical_bytes=0, parent=parent, prev=m.prev, ref=m.ref,
                       message=m.message, extra=m.extra)  # fmt: skip
        writer = self.tier.create()
        try:
            with progress_bar(len(models), "rebasing models", progress, unit="model") as bar:
                blobs = self._write_payload(writer, new, models, tolerance=None,
                                            max_chain=DEFAULT_MAX_CHAIN,
                                            max_recovery=max_recovery, recipe=None, check=True,
                                            progress=bar, saved_orders=saved,
                                            derived_from=derived or None,
                                            compress=compress)  # fmt: skip
            pack_size = writer.finish()
        except BaseException:
            writer.abort()
            raise
        try:
            with self.catalog.transaction():
                puts, deletes, live_in_pack = swap_references(
                    self.catalog, blobs, version_blobs(m), writer.pack_id, pack_size, new
                )
                try:
                    self.catalog.commit(puts, deletes)  # the pack stays from here on (see save)
                finally:  # a commit that raised may still be durable: never serve the old record
                    self.storage.manifests.pop(m.id, None)
        except ConflictError:  # (object storage: another writer changed its records)
            self.tier.delete(writer.pack_id)
            raise
        if not live_in_pack:
            self.tier.delete(writer.pack_id)

    # -- load ------------------------------------------------------------
    @_refreshing
    def load(
        self,
        version: str,
        *,
        device: str | torch.device = "cpu",
        verify: bool = True,
        models: list[str] | None = None,
        allow_code_change: bool = False,
    ) -> dict[str, StateDict]:
        """Recovers a whole set: {model name: {tensor name: tensor}} in saved order.

        Tensors of one group are views of one buffer. With ``verify`` (default)
        every tensor's BLAKE3 is checked; a mismatch raises IntegrityError. A
        provenance version is retrained (on ``device``) and always checked against
        its recorded hashes; ``allow_code_change`` retrains with a trainer whose
        code changed since the save.
        """
        _args.flag(verify, "verify")
        _args.flag(allow_code_change, "allow_code_change")
        dev = _args.device(device)
        wanted = None if models is None else _args.name_list(models, "models")
        return load.load(self.storage, self.manifest(version), wanted, dev, verify,
                         allow_code_change)  # fmt: skip

    @_refreshing
    def load_stacked(
        self,
        version: str,
        *,
        device: str | torch.device = "cpu",
        verify: bool = True,
        allow_code_change: bool = False,
    ) -> StackedSet:
        """Recovers a whole set as stacks: per architecture group, the model names and
        {tensor name: [N, ...] tensor} (an ``mmcore.stacked.StackedSet``; a set of one
        architecture also answers ``.names``, ``.params`` and ``.forward``).

        On the CPU a baseline group's tensors are strided views of its stored records:
        no copy (copy-on-write, as ``load``); an update version's models are gathered
        into one buffer per group by one native call; a provenance version is retrained
        (stacked where its trainer is). On a device: one copy per group. With
        ``verify`` (default) every tensor's BLAKE3 is checked."""
        _args.flag(verify, "verify")
        _args.flag(allow_code_change, "allow_code_change")
        dev = _args.device(device)
        return load.load_stacked(self.storage, self.manifest(version), dev, verify,
                                 allow_code_change)  # fmt: skip

    def save_stacked(self, names: Any, params: Mapping[str, torch.Tensor] | None = None,
                     **kwargs: Any) -> str:  # fmt: skip
        """Saves a set given as stacked tensors and returns the version id, as ``save``
        does with the same keywords (approach, parent, ref, message, tolerance, ...).

        ``names`` (N model names) with ``params`` ({tensor name: [N, ...] tensor}, on
        the CPU or one GPU) is one architecture; a ``Stack`` or ``StackedSet`` (from
        ``load_stacked``, whose version order is kept) is passed alone. The version is
        the one saving ``{names[i]: {k: params[k][i]}}`` gives, bit for bit; a baseline is written
        from address tables over the stacks' strides, with no step per model."""
        if params is None:
            parts = _stack_parts(names)
            order = names.order if isinstance(names, StackedSet) else None
        else:
            parts, order = [(names, params)], None
        return self.save(StackedInput(parts, order), **kwargs)

    def load_modules(
        self,
        version: str,
        factory: Callable[[str], torch.nn.Module] | torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        verify: bool = True,
        allow_code_change: bool = False,
    ) -> dict[str, torch.nn.Module]:
        """Recovers a set as ``nn.Module`` objects, {name: module} in the version's order.

        ``factory(name)`` builds an empty module of a group's architecture (called once
        per architecture, with the group's first model's name; ``torch.device("meta")``
        construction works and is fastest), or pass one template module. It is checked
        against the stored tensors as a strict ``load_state_dict`` would; every model is
        then a clone of it (same class, attributes, ``training`` flag, ``requires_grad``,
        shared parameters shared) whose parameters and buffers are that model's
        recovered tensors (views of the group's records, copy-on-write), without running
        ``__init__`` per model: the modules a loop of ``factory()`` and
        ``load_state_dict`` makes, many times faster."""
        if not (callable(factory) or isinstance(factory, torch.nn.Module)):
            raise InvalidArgumentError(
                f"factory must be a callable returning a torch.nn.Module (or a module), got {type(factory).__name__}"
            )
        stacks = self.load_stacked(
            version, device=device, verify=verify, allow_code_change=allow_code_change
        )
        built: dict[str, torch.nn.Module] = {}
        for g in stacks.groups:
            built.update(build_modules(g, factory))
        return stacks.in_order(built)

    @_refreshing
    def load_model(
        self,
        version: str,
        name: str,
        *,
        device: str | torch.device = "cpu",
        verify: bool = True,
        allow_code_change: bool = False,
    ) -> StateDict:
        """Recovers one model, reading only that model's bytes (and, for an update
        version, the deltas of its chain; a provenance version retrains as ``load``:
        the same batched computation, so the same bits)."""
        _args.text(name, "model name")
        _args.flag(verify, "verify")
        _args.flag(allow_code_change, "allow_code_change")
        dev = _args.device(device)
        return load.load_model(self.storage, self.manifest(version), name, dev, verify,
                               allow_code_change)  # fmt: skip

    # -- inspect ---------------------------------------------------------
    def info(self, version: str) -> VersionInfo:
        return self._info(self.manifest(version), {})

    def _info(self, m: Manifest, depths: dict[str, int]) -> VersionInfo:
        refs = tuple(sorted(r for r, v in self.refs().items() if v == m.id))
        return VersionInfo.of(m, refs, self._depth(m, depths))

    def _depth(self, m: Manifest, depths: dict[str, int]) -> int:
        """Versions of its approach back to the nearest of another (an update's to its
        baseline): counted along the chain as it is now, since a rebase of an ancestor
        shortens it without rewriting the versions after it. ``depths`` memoises."""
        walked: list[str] = []
        up, depth = m, 0
        while up.approach == m.approach and up.parent is not None and m.approach != "baseline":
            if up.id in depths:
                depth += depths[up.id]
                break
            walked.append(up.id)
            up = self.manifest(up.parent)
        else:
            depth = 0
        total = depth + len(walked)
        for i, vid in enumerate(walked):
            depths[vid] = total - i
        return total

    def versions(self) -> list[VersionInfo]:
        """Every version in the store, newest first."""
        self._check_open()
        ids = [k.decode() for k, _ in self.catalog.scan("manifests")]
        depths: dict[str, int] = {}
        infos = [self._info(self.manifest(v), depths) for v in ids]
        return sorted(infos, key=lambda i: i.created, reverse=True)

    def log(self, ref: str | None = None) -> list[VersionInfo]:
        """Versions reachable from ``ref`` (parents, then earlier heads), newest first.

        Without a ref: every version in the store.
        """
        if ref is None:
            return self.versions()
        self._check_open()
        _args.ref_name(ref)
        head = self.catalog.get("refs", ref.encode())
        if head is None:
            raise RefNotFoundError(
                f"no ref {ref!r} in {self.path}; refs: {', '.join(sorted(self.refs())) or 'none'}"
            )
        return list(self._walk(ref_target(ref, head)))

    def _walk(self, vid: str | None) -> Iterator[VersionInfo]:
        seen: set[str] = set()
        # The walk ends at the first version that was deleted: an earlier head of
        # the ref may be deleted while later versions stay.
        while vid is not None and vid not in seen and self.catalog.get("manifests", vid.encode()):
            seen.add(vid)
            m = self.manifest(vid)
            yield self.info(vid)
            vid = m.parent if m.parent is not None else m.prev

    def verify(self, version: str | None = None) -> VerifyReport:
        """Re-hashes every stored byte of one version (or all, and then also recounts
        every content record's references). Goes on past a problem: a single problem
        raises its own error (IntegrityError naming model and tensor, CorruptRecordError
        ...); several raise ONE IntegrityError listing them all (``.problems``; ``.model``
        and ``.tensor`` of the first); none returns the report, an int of the tensors
        checked. ``check`` returns the report without raising.
        """
        report = self.check(version)
        first = report.first_error
        if len(report.problems) == 1 and first is not None:
            raise first  # one problem: its own error, of its own type (CorruptRecordError, ...)
        if report.problems:
            raise IntegrityError(f"{len(report.problems)} problems: " + " | ".join(report.problems),
                                 model=getattr(first, "model", None), tensor=getattr(first, "tensor", None),
                                 problems=report.problems)  # fmt: skip
        return report

    def _verify_one(self, vid: str) -> int:
        m = self.manifest(vid)
        checked = 0
        for group in m.groups:
            self.storage.reader.verify_group(m, group)
        if m.provenance is not None:  # its hash table and its dataset (retraining: load it)
            table = self.storage.reader.stored_hashes(
                self.storage.content(m.provenance.hashes_blob)
            )
            if retrain.roots_key(table) != m.provenance.hashes_blob:
                raise IntegrityError(f"version {m.id}: its table of recorded hashes is corrupted")
            return retrain.verify_dataset(self.storage, str(m.provenance.recipe["data"]))
        if m.update is None:
            for name in m.orders:  # a recorded order names exactly the model's tensors
                load.baseline_order(m, name)
            return m.num_tensors
        # what it inherits fits together (orders, deltas, adds)
        chain.model_index(self.storage, vid)
        checked += sum(g.count * len(g.schema.tensors) for g in m.groups)
        if m.update.changed:  # its tables re-read and re-hashed (the cache is not trusted),
            chain.read_delta_blob(self.storage, m)  # then decoding checks each tensor's hash
            got = chain.recover(self.storage, vid, set(m.update.changed), verify=True)
            checked += sum(len(got[name]) for name in m.update.changed)
        return checked

    def check(self, version: str | None = None) -> VerifyReport:
        """``verify`` that goes on past a problem: every version (or one) re-hashed, and,
        for the whole store, every content record's reference count recomputed from the
        manifests and datasets that use it. Returns what it found and never raises for a
        damaged store: a record that cannot be decoded is one problem among the others.
        A read-only store first catches up with its writer (``Storage.refresh``)."""
        self._check_open()
        if self.readonly:
            self.storage.refresh()
        ids = [self.resolve(version)] if version is not None else self._version_ids()
        tensors = versions = 0
        problems: list[str] = []
        first: Exception | None = None
        for vid in ids:
            try:
                with decoding(vid):
                    tensors += self._verify_one(vid)
                versions += 1
            except NativeModuleError:  # nothing could be checked: not damage to the store
                raise
            except Exception as exc:  # every problem is reported, none raised
                text = str(exc) if isinstance(exc, MMCoreError) else f"{type(exc).__name__}: {exc}"
                problems.append(
                    text if text.startswith(f"version {vid}") else f"version {vid}: {text}"
                )
                first = first or exc
        if version is None:
            problems += self.check_references()
        return VerifyReport(tensors, versions, problems, first)

    def _version_ids(self) -> list[str]:
        """Every version id, newest first where its manifest can say when it was made
        (one that cannot be decoded comes first: check reports it)."""
        created: list[tuple[float, str]] = []
        for key, raw in self.catalog.scan("manifests"):
            vid = key.decode("utf-8", errors="replace")
            try:
                created.append((-Manifest.decode(raw).created, vid))
            except MMCoreError:
                created.append((-float("inf"), vid))
        return [vid for _, vid in sorted(created)]

    def check_references(self) -> list[str]:
        """Content records whose reference counts differ from the manifests and
        datasets that reference them, and references to blobs that have no record."""
        want: dict[bytes, int] = {}
        problems: list[str] = []
        unread = 0  # records whose references are unknown: counts cannot be compared
        for _, raw in self.catalog.scan("manifests"):
            try:
                blobs = version_blobs(Manifest.decode(raw))
            except MMCoreError:  # reported with its version by check
                unread += 1
                continue
            for blob in blobs:
                want[blob] = want.get(blob, 0) + 1
        for key, raw in self.catalog.scan("datasets"):
            try:
                groups = DatasetRecord.decode(raw).groups
            except MMCoreError as exc:
                problems.append(f"dataset {key.decode('utf-8', errors='replace')}: {exc}")
                unread += 1
                continue
            for group in groups:
                want[group.blob] = want.get(group.blob, 0) + 1
        have: dict[bytes, int] = {}
        for key, raw in self.catalog.scan("content"):
            try:
                have[key] = ContentRecord.decode(raw).refs
            except MMCoreError as exc:
                problems.append(f"content {key.hex()[:16]}: {exc}")
                want.pop(key, None)  # reported: its count is unknown
        if unread:
            problems.append(
                f"reference counts not compared: {unread} manifest or dataset record(s) cannot "
                "be decoded"
            )
            return problems
        for key in sorted(set(want) | set(have)):
            if want.get(key, 0) != have.get(key, 0):
                problems.append(
                    f"content {key.hex()[:16]}: {have.get(key, 'no record')} reference(s) recorded, "
                    f"{want.get(key, 0)} in use"
                )
        return problems

    # -- delete and reclaim ----------------------------------------------
    def delete_ref(self, ref: str) -> None:
        """Removes a ref (the versions it pointed to stay)."""
        self._check_writable()
        _args.ref_name(ref)
        with self.catalog.transaction():
            if self.catalog.get("refs", ref.encode()) is None:
                raise RefNotFoundError(f"no ref {ref!r} in {self.path}")
            self.catalog.commit(deletes=[("refs", ref.encode())])

    def delete(self, version: str, *, cascade: bool = False) -> list[str]:
        """Deletes a version; its bytes are reclaimed by ``gc()`` once nothing references
        them. Returns the ids deleted.

        A version other versions are stored against (update children, provenance
        children) is refused with ``DependentsError`` naming them, unless ``cascade``:
        then it goes with every version that needs it, in one atomic commit. Refused
        while a ref points at any of them. A version named only as an older head of a
        ref (``prev``) may go: ``log`` then ends where it was.
        """
        self._check_writable()
        _args.flag(cascade, "cascade")
        with self.catalog.transaction():  # (object storage: ConflictError where another
            return self._delete(version, cascade)  # writer changed what it read)

    def _delete(self, version: str, cascade: bool) -> list[str]:
        m = self.manifest(version)
        children: dict[str, list[str]] = {}
        for key, raw in self.catalog.scan("manifests"):
            parent = Manifest.decode(raw).parent
            if parent is not None:
                children.setdefault(parent, []).append(key.decode())
        doomed = [m.id]
        if children.get(m.id) and not cascade:
            raise DependentsError(
                f"version {m.id} is the parent of {', '.join(sorted(children[m.id]))}, which are "
                "stored against it; delete those first, or pass cascade=True to delete them too",
                dependents=sorted(children[m.id]),
            )
        for vid in doomed:  # grows while it is walked: every descendant, parents first
            doomed.extend(c for c in children.get(vid, []) if c not in doomed)
        heads = sorted(r for r, v in self.refs().items() if v in doomed)
        if heads:
            raise InvalidArgumentError(
                f"version(s) to delete are the head of ref(s) {', '.join(heads)}; move them with "
                "a new save or remove them with store.delete_ref(name) first"
            )
        counts: dict[bytes, int] = {}
        for vid in doomed:
            for blob in version_blobs(self.manifest(vid)):
                counts[blob] = counts.get(blob, 0) + 1
        puts, deletes = [], [("manifests", vid.encode()) for vid in doomed]
        for blob, n in counts.items():
            rec = self.storage.content(blob)
            rec.refs -= n
            if rec.refs > 0:
                puts.append(("content", blob, rec.encode()))
            else:
                deletes.append(("content", blob))
        try:
            self.catalog.commit(puts, deletes)
        finally:  # a commit that raised may still be durable: never serve the old records
            for vid in doomed:
                self.storage.manifests.pop(vid, None)
        return doomed

    # -- push and pull -------------------------------------------------------
    def push(self, to: ModelStore, ref: str | None = None, *,
             progress: bool | None = None) -> TransferReport:  # fmt: skip
        """Copies into store ``to`` (local or s3://) every version it lacks (or those
        ``ref`` needs: its version and every version that one is stored against) and
        moves the refs there (or ``ref``). Content-addressed: only the blobs ``to``
        does not hold travel; one commit there makes the copy visible, whole."""
        if not isinstance(to, ModelStore):
            raise InvalidArgumentError(
                f"push needs a ModelStore to copy to, got {type(to).__name__}"
            )
        if ref is not None:
            _args.ref_name(ref)
        _args.optional_flag(progress, "progress")
        self._check_open()
        to._check_writable()
        return transfer.transfer(self.storage, to.storage, ref, progress=progress)

    def pull(self, source: ModelStore, ref: str | None = None, *,
             progress: bool | None = None) -> TransferReport:  # fmt: skip
        """``source.push(self, ref)``: the versions this store lacks, copied from ``source``."""
        if not isinstance(source, ModelStore):
            raise InvalidArgumentError(
                f"pull needs a ModelStore to copy from, got {type(source).__name__}"
            )
        return source.push(self, ref, progress=progress)

    # -- exchange ----------------------------------------------------------
    def export(
        self,
        version: str,
        directory: str | os.PathLike[str],
        *,
        models: list[str] | None = None,
        progress: bool | None = None,
    ) -> list[Path]:
        """Writes each model of a version (or ``models``) to ``directory/<name>.safetensors``,
        tensor names kept. Everything is checked first (free file names, dtypes the
        format holds): an error leaves no file behind. Returns the files written."""
        self._check_open()
        _args.optional_flag(progress, "progress")
        target = Path(_args.path(directory))
        got = self.load(version, models=models)
        with progress_bar(len(got), "exporting models", progress, unit="model") as bar:
            return exchange.export_models(got, target, bar)

    def import_(
        self,
        directory: str | os.PathLike[str],
        *,
        approach: str = "baseline",
        parent: str | None = None,
        ref: str | None = None,
        message: str | None = None,
        tolerance: float | None = None,
        compress: bool = False,
        progress: bool | None = None,
    ) -> str:
        """Saves the ``.safetensors`` files of ``directory`` (one model each, named after
        the file) as a new version: a baseline, or an update of ``parent``."""
        self._check_writable()
        files = exchange.exported_files(Path(_args.path(directory)))
        return self.save(exchange.read_models(files), approach=approach, parent=parent, ref=ref,
                         message=message, tolerance=tolerance, compress=compress,
                         progress=progress)  # fmt: skip

    # -- datasets ----------------------------------------------------------
    def put_dataset(self, data: Any, *, compress: bool = False,
                    progress: bool | None = None) -> str:  # fmt: skip
        """Stores a dataset ({name: {tensor name: tensor}}, e.g. per model its inputs and
        targets) and returns its id for ``mmcore.Recipe(data=...)``. Content-addressed:
        the same names and bytes stored again cost nothing and give the same id (with
        or without ``compress``, which codes its tensors as ``save``'s does)."""
        self._check_writable()
        _args.flag(compress, "compress")
        _args.optional_flag(progress, "progress")
        with progress_bar(_count(data), "storing dataset", progress, unit="entry") as bar:
            return retrain.put_dataset(self.storage, data, bar, compress)  # (a transaction)

    def datasets(self) -> dict[str, dict[str, Any]]:
        """{dataset id: its entries, logical and stored bytes, and the versions using it}."""
        self._check_open()
        out = {}
        for key, raw in self.catalog.scan("datasets"):
            rec = DatasetRecord.decode(raw)
            out[key.decode()] = {"entries": len(rec.names), "logical_bytes": rec.logical_bytes,
                                 "stored_bytes": rec.stored_bytes,
                                 "used_by": retrain.users(self.storage, rec.id)}  # fmt: skip
        return out

    def load_dataset(
        self, dataset: str, *, device: str | torch.device = "cpu"
    ) -> dict[str, StateDict]:
        """A stored dataset, every tensor hash-checked."""
        self._check_open()
        return retrain.load_dataset(self.storage, dataset, _args.device(device))

    def delete_dataset(self, dataset: str) -> None:
        """Deletes a dataset no version uses; ``gc()`` then reclaims its bytes."""
        self._check_writable()
        with self.catalog.transaction():
            retrain.delete_dataset(self.storage, dataset)

    def gc(self, *, compact_below: float = 0.5, progress: bool | None = None,
           grace_s: float | None = None, compress: bool = False) -> int:  # fmt: skip
        """Deletes pack files nothing references (deleted versions, interrupted saves),
        then rewrites every pack whose live bytes are below ``compact_below`` of its size
        (0: never; above 1: every pack) with only those bytes. Crash-safe: a kill at any
        point loses no referenced byte, and the next gc reclaims what it left.

        With ``compress=True`` it also rewrites every pack that holds models stored
        plain, coding them as ``save(..., compress=True)`` would (lossless; each coded
        chunk is decoded and compared with its models before it is written): the way to
        compress a store saved without it. Every version reads as before.

        Returns the bytes reclaimed. Run it while no other process reads the store
        (a reader that cached a compacted pack's offsets must reopen).

        On object storage, where other writers may be saving meanwhile, a pack written
        less than ``grace_s`` seconds ago (default: the store's ``gc_grace_s``, an hour
        unless set) stays even if nothing references it yet: it may be a save's that
        has not committed. A reader that finds a pack gone there catches up with the
        catalog and reads again.
        """
        self._check_writable()
        if grace_s is None:
            grace_s = self.gc_grace_s
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s >= 0:
            raise InvalidArgumentError(f"grace_s must be a number >= 0, got {grace_s!r}")
        if (
            isinstance(compact_below, bool)
            or not isinstance(compact_below, (int, float))
            or not 0 <= compact_below <= 2
        ):
            raise InvalidArgumentError(
                f"compact_below must be a number in [0, 2], got {compact_below!r}"
            )
        with self.catalog.transaction():
            live = {ContentRecord.decode(raw).pack for _, raw in self.catalog.scan("content")}
            recorded = {k.decode() for k, _ in self.catalog.scan("packs")}
            dead_records = sorted(recorded - live)
            if dead_records:
                self.catalog.commit(deletes=[("packs", p.encode()) for p in dead_records])
        reclaimed = 0
        for pack, age in self.tier.ages().items():
            if pack not in live and age >= grace_s:
                reclaimed += self.tier.size(pack)
                self.tier.delete(pack)
        if not isinstance(compress, bool):
            raise InvalidArgumentError(f"compress must be True or False, got {compress!r}")
        with self.catalog.transaction():
            return reclaimed + compact.compact(self.storage, float(compact_below), progress,
                                               compress)  # fmt: skip

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyStoreError(
                "this store was opened read-only; reopen it with readonly=False"
            )

    def stored_bytes(self) -> int:
        """Bytes the whole store occupies on disk (or in its bucket): packs plus catalog."""
        return self.tier.total_bytes() + self.catalog.approximate_bytes()


def _stack_parts(stacks: Any) -> list[tuple[Any, Any]]:
    if isinstance(stacks, Stack):
        return [(stacks.names, stacks.params)]
    if isinstance(stacks, StackedSet):
        return [(g.names, g.params) for g in stacks.groups]
    raise InvalidModelSetError(
        "save_stacked takes names and {tensor name: [models, ...] tensor}, or a Stack or "
        f"StackedSet alone; got {type(stacks).__name__} and no params"
    )


def _count(models: Any) -> int | None:
    try:
        return len(models)
    except TypeError:
        return None
