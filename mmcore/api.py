"""The public API: ``mmcore.open`` and ``ModelStore``."""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from . import _args, exchange, transfer
from ._progress import progress_bar
from .errors import (
    ConflictError,
    CorruptRecordError,
    DependentsError,
    IntegrityError,
    InvalidArgumentError,
    InvalidModelSetError,
    MMCoreError,
    ModelNotFoundError,
    NativeModuleError,
    PackMissingError,
    ReadOnlyStoreError,
    RefConflictError,
    RefNotFoundError,
    StoreError,
    VersionNotFoundError,
    decoding,
)
from .manifest import APPROACHES, ContentRecord, DatasetRecord, Manifest, decode_pack_record
from .modelset import Schema, StackedInput
from .paths import baseline, chain, retrain, update
from .paths.commit import swap_references, version_blobs, version_records
from .paths.delta_blob import DeltaTable
from .paths.reader import BlobReader, StateDict, record_columns
from .recipe import Recipe
from .record import ref_target
from .stacked import Stack, StackedSet, build_modules
from .store import Catalog, LocalPackTier, StoreLayout, compact, remote
from .store.packs import PackWriter, PayloadTier
from .store.remote import LogCatalog
from .transfer import TransferReport
from .versions import VerifyReport, VersionInfo

_HEX = frozenset("0123456789abcdef")
GC_GRACE_S = 3600.0  # object storage: gc leaves a pack this young (a save may commit it yet)
_COMMIT_ATTEMPTS = 8  # a save's commit, built again after another writer's commit
DEFAULT_MAX_CHAIN = 16
# A model is stored whole again (a keyframe) once recovering it through its deltas
# would cost more than this many times recovering it whole (bytes read and decoded).
DEFAULT_MAX_RECOVERY = 2.0
_MANIFEST_CACHE = 64  # a chain of updates is walked whole on every load


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
            self._refresh()
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
    """

    catalog: Catalog | LogCatalog
    tier: PayloadTier

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
        self._closed = True  # until every resource below is open
        self.remote = remote.is_url(path)
        self.gc_grace_s = GC_GRACE_S if self.remote else 0.0  # see gc()
        if self.remote:
            if storage_options is not None and not isinstance(storage_options, Mapping):
                raise InvalidArgumentError(
                    f"storage_options must be a mapping, got {type(storage_options).__name__}"
                )
            client, self.catalog = remote.open_remote(
                str(path), dict(storage_options or {}), readonly=self.readonly, create=create
            )
            self.path: Path | str = client.url
            ranges = (
                None if cache is None else remote.RangeCache(Path(_args.path(cache)), client.url)
            )
            self.tier = remote.ObjectPackTier(client, self._pack_size, ranges)
        else:
            if storage_options is not None or cache is not None:
                raise InvalidArgumentError("storage_options and cache are for s3:// stores only")
            self.path = Path(_args.path(path))
            self._layout = StoreLayout(self.path)
            created = self._layout.check_or_create(create=create and not readonly)
            self.catalog = Catalog(self._layout.catalog, readonly=readonly)
            if created is not None:
                try:
                    self._layout.make_durable(created)
                except BaseException:
                    self.catalog.close()
                    raise
            self.tier = LocalPackTier(self._layout.packs)
        self._reader = BlobReader(self.tier, self._content)
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._delta_tables: dict[tuple[Any, ...], DeltaTable] = {}  # paths.chain.delta_table's
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcore-reader")
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown()
            self.tier.close()
            self.catalog.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.path)!r}, readonly={self.readonly})"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this store is closed; open it again with mmcore.open(path)")

    def _pack_size(self, pack_id: str) -> int | None:
        """A pack's size from its catalog record (no request to the object store)."""
        raw = self.catalog.get("packs", pack_id.encode())
        return None if raw is None else int(decode_pack_record(raw)["size"])

    def _refresh(self) -> None:
        """A read-only store catches up with its writer: the catalog reopened, every
        cache and open pack dropped (mappings already handed out stay valid). A
        store on object storage reads the commits made since instead."""
        if isinstance(self.catalog, LogCatalog):
            self.catalog.refresh()
            self._manifests.clear()
            self._delta_tables.clear()
            return
        assert self.readonly
        self.catalog.close()
        try:
            self.catalog = Catalog(self._layout.catalog, readonly=True)
        except BaseException:
            self._closed = True  # no catalog to read: closed, not half-open
            raise
        self._manifests.clear()
        self._delta_tables.clear()
        self.tier.close()

    # -- lookups ---------------------------------------------------------
    def _content(self, key: bytes) -> ContentRecord:
        raw = self.catalog.get("content", key)
        if raw is None:
            raise CorruptRecordError(
                f"content record {key.hex()[:16]} is missing: the store's catalog is damaged"
            )
        return ContentRecord.decode(raw)

    def resolve(self, version_or_ref: str) -> str:
        """The full version id for an id, a unique id prefix (>= 4 hex digits), or a ref."""
        self._check_open()
        _args.version(version_or_ref)
        key = version_or_ref.encode()
        if self.catalog.get("manifests", key) is not None:
            return version_or_ref
        head = self.catalog.get("refs", key)
        if head is not None:
            vid = ref_target(version_or_ref, head)
            if self.catalog.get("manifests", vid.encode()) is None:
                raise CorruptRecordError(
                    f"ref {version_or_ref!r} points to version {vid}, which is not in the store: "
                    "the store's catalog is damaged"
                )
            return vid
        if len(version_or_ref) >= 4 and set(version_or_ref) <= _HEX:
            matches = [k.decode() for k, _ in self.catalog.scan("manifests", key)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise VersionNotFoundError(
                    f"version prefix {version_or_ref!r} is ambiguous ({len(matches)} versions); give more digits"
                )
        raise VersionNotFoundError(
            f"no version or ref {version_or_ref!r} in {self.path}; `mmcore log {self.path}` lists them"
        )

    def manifest(self, version_or_ref: str) -> Manifest:
        vid = self.resolve(version_or_ref)
        cached = self._manifests.get(vid)
        if cached is not None:
            self._manifests.move_to_end(vid)
            return cached
        raw = self.catalog.get("manifests", vid.encode())
        if raw is None:
            raise VersionNotFoundError(f"version {vid} vanished while reading it")
        manifest = Manifest.decode(raw)
        self._manifests[vid] = manifest
        if len(self._manifests) > _MANIFEST_CACHE:
            self._manifests.popitem(last=False)
        return manifest

    def refs(self) -> dict[str, str]:
        self._check_open()
        out = {}
        for k, v in self.catalog.scan("refs"):
            name = k.decode("utf-8", errors="replace")
            out[name] = ref_target(name, v)
        return out

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
                                            recipe=recipe, check=check,
                                            progress=bar)  # fmt: skip
            pack_size = writer.finish()
        except BaseException:
            writer.abort()  # nothing references the pack yet
            raise
        self._commit_version(manifest, blobs, writer.pack_id, pack_size)
        return vid

    def _commit_version(self, manifest: Manifest, blobs: list[tuple[bytes, ContentRecord]],
                        pack_id: str, pack_size: int) -> None:  # fmt: skip
        """Commits a saved version whose pack is written. On object storage, a commit
        whose records another writer changed meanwhile (a shared blob's reference
        count, say) is built again from the records as they are now, a few times; a
        ref another writer moved raises ``RefConflictError`` (and the pack goes)."""
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                with self.catalog.transaction():
                    puts, live_in_pack = version_records(self.catalog, manifest, blobs, pack_id,
                                                         pack_size)  # fmt: skip
                    # From here on the pack stays whatever happens: a commit that raised
                    # (an interrupt arriving after the write, a failed WAL sync, a lost
                    # response) may still be durable and reference it. An unreferenced
                    # pack is reclaimed by gc().
                    self.catalog.commit(puts)
                break
            except (RefConflictError, VersionNotFoundError):  # nothing references the pack
                self.tier.delete(pack_id)
                raise
            except ConflictError:
                if attempt == _COMMIT_ATTEMPTS - 1:
                    self.tier.delete(pack_id)
                    raise
        if not live_in_pack:  # every blob was already stored: the new pack holds nothing
            self.tier.delete(pack_id)

    def _write_payload(self, writer: PackWriter, manifest: Manifest, models: Any, *,
                       tolerance: float | None, max_chain: int, max_recovery: float | None,
                       recipe: Recipe | None, check: bool, progress: Any,
                       saved_orders: dict[str, list[str]] | None = None
                       ) -> list[tuple[bytes, ContentRecord]]:  # fmt: skip
        """Writes a version's payload by its approach into ``writer``; fills the manifest's
        models, groups and path records; returns the blobs to reference. ``saved_orders``
        (a rebase): the models come in their schemas' tensor order, kept; these are the
        orders they were saved in."""
        parent = manifest.parent
        if manifest.approach == "update":
            assert parent is not None
            with torch.no_grad():  # a module's parameters are read as they are, not detached
                up = update.write_update(self, writer, models, parent, tolerance=tolerance,
                                         max_chain=max_chain, max_recovery=max_recovery,
                                         progress=progress, saved_orders=saved_orders)  # fmt: skip
            manifest.groups, manifest.update, manifest.logical_bytes = (
                up.groups,
                up.update,
                up.logical_bytes,
            )
            return up.blobs
        if manifest.approach == "provenance":
            assert parent is not None and recipe is not None
            pv = retrain.write_provenance(
                self, writer, models, parent, recipe, check=check, progress=progress
            )
            manifest.provenance, manifest.logical_bytes = pv.info, pv.logical_bytes
            return pv.blobs
        with torch.no_grad():
            written = baseline.write_set(writer, models, progress)
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
        progress: bool | None = None,
    ) -> None:
        """Rewrites a version in place (same id, same models, bit for bit) as a baseline,
        or as a lossless update of another ``parent`` (models whose recovery through
        ``parent``'s chain would pass ``max_recovery``, as in ``save``, stored whole), so
        that what it was stored against can be deleted. Versions stored against it stay
        valid: it recovers to the same bytes. Refs, ``prev`` and the message are kept;
        one atomic commit."""
        self._check_writable()
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
                index = chain.model_index(self, m.id)
            saved = {n: list(sd) for n, sd in models.items()}
            models = {n: {s.name: sd[s.name] for s in index[n].schema.tensors}
                      for n, sd in models.items()}  # fmt: skip
        new = Manifest(id=m.id, approach="update" if parent else "baseline", created=m.created,
                       models=[], groups=[], logical_bytes=0, parent=parent, prev=m.prev, ref=m.ref,
                       message=m.message, extra=m.extra)  # fmt: skip
        writer = self.tier.create()
        try:
            with progress_bar(len(models), "rebasing models", progress, unit="model") as bar:
                blobs = self._write_payload(writer, new, models, tolerance=None,
                                            max_chain=DEFAULT_MAX_CHAIN,
                                            max_recovery=max_recovery, recipe=None, check=True,
                                            progress=bar, saved_orders=saved)  # fmt: skip
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
                    self._manifests.pop(m.id, None)
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
        manifest = self.manifest(version)
        if manifest.provenance is not None:
            got = retrain.recover(
                self, manifest, device=dev, allow_code_change=allow_code_change
            ).state_dicts()
            orders = self._tensor_orders(manifest)
            got = {n: {k: sd[k] for k in orders[n]} if n in orders else sd for n, sd in got.items()}
            if models is None:
                return got
            names = _args.name_list(models, "models")
            _refuse_missing(manifest.id, [n for n in names if n not in got])
            return {n: got[n] for n in names}
        wanted = None if models is None else _args.name_list(models, "models")
        with decoding(manifest.id):
            return self._load_stored(manifest, wanted, dev, verify)

    def _tensor_orders(self, manifest: Manifest) -> dict[str, list[str]]:
        """The tensor orders a provenance version's models keep: its nearest stored
        ancestor's, where they differ from their schema's (stacks come in that)."""
        while manifest.provenance is not None:
            assert manifest.parent is not None
            manifest = self.manifest(manifest.parent)
        if manifest.update is None:  # a baseline: its schemas' order, or its recorded one
            with decoding(manifest.id):
                found = {n: self._baseline_order(manifest, n) for n in manifest.orders}
            return {n: order for n, order in found.items() if order is not None}
        with decoding(manifest.id):
            index = chain.model_index(self, manifest.id)
        return {n: info.order for n, info in index.items() if info.order}

    def _load_stored(self, manifest: Manifest, names: list[str] | None, dev: torch.device,
                     verify: bool) -> dict[str, StateDict]:  # fmt: skip
        """``load`` of a baseline or update version."""
        if manifest.update is not None:
            return self._load_update(manifest, names, dev, verify)
        if names is not None:
            _refuse_missing(manifest.id, [n for n in names if manifest.locate(n) is None])
            return {name: self.load_model(manifest.id, name, device=dev, verify=verify)
                    for name in names}  # fmt: skip
        out: list[StateDict | None] = [None] * len(manifest.models)
        for group in manifest.groups:
            states = self._reader.read_group(
                manifest, group, verify=verify, device=dev, pool=self._pool
            )
            for mi, state in zip(group.positions(), states):
                out[mi] = state
        got = {name: state for name, state in zip(manifest.models, out) if state is not None}
        for name in manifest.orders:  # (a baseline written by a rebase)
            order = self._baseline_order(manifest, name)
            if order is not None and name in got:
                got[name] = {k: got[name][k] for k in order}
        return got

    def _baseline_order(self, manifest: Manifest, name: str) -> list[str] | None:
        """The tensor order a baseline recorded for a model, checked against its schema."""
        order = manifest.orders.get(name)
        where = manifest.locate(name)
        if order is None or where is None:
            return None
        return chain.checked_order(manifest, name, order, manifest.groups[where[0]].schema)

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
        manifest = self.manifest(version)
        if manifest.provenance is not None:
            return retrain.recover(self, manifest, device=dev, allow_code_change=allow_code_change)
        with decoding(manifest.id):
            if manifest.update is not None:
                order, parts = chain.recover_records(self, manifest.id, verify=verify)
                return StackedSet([_stack_of(names, buf, schema, dev) for schema, names, buf in parts],
                                  order)  # fmt: skip
            return self._stacked_groups(manifest, verify=verify, device=dev)

    def _stacked_groups(
        self, manifest: Manifest, *, verify: bool, device: torch.device
    ) -> StackedSet:
        """The groups of a baseline manifest (or a dataset's) as stacks."""
        stacks = []
        for group in manifest.groups:
            buf = self._reader.read_records(manifest, group, verify=verify, pool=self._pool)
            names = [manifest.models[i] for i in group.positions()]
            stacks.append(_stack_of(names, buf, group.schema, device))
        return StackedSet(stacks, manifest.models)

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

    def _load_update(self, manifest: Manifest, names: list[str] | None, device: torch.device,
                     verify: bool) -> dict[str, StateDict]:  # fmt: skip
        got = chain.recover(self, manifest.id, None if names is None else set(names), verify=verify,
                            device=None if device.type == "cpu" else device)  # fmt: skip
        if names is not None:
            _refuse_missing(manifest.id, [n for n in names if n not in got])
            got = {n: got[n] for n in names}
        return got

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
        dev = _args.device(device)
        manifest = self.manifest(version)
        if manifest.provenance is not None:
            return self.load(
                manifest.id, device=dev, models=[name], allow_code_change=allow_code_change
            )[name]
        where = None if manifest.update is not None else manifest.locate(name)
        if manifest.update is None and where is None:
            raise ModelNotFoundError(
                f"version {manifest.id} has no model {name!r} ({len(manifest.models)} models)"
            )
        with decoding(manifest.id):
            if manifest.update is not None:
                return self._load_update(manifest, [name], dev, verify)[name]
            assert where is not None
            gi, pos = where
            state = self._reader.read_model(
                manifest, manifest.groups[gi], pos, verify=verify, device=dev
            )
            order = self._baseline_order(manifest, name)
            return state if order is None else {k: state[k] for k in order}

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
            self._reader.verify_group(m, group)
        if m.provenance is not None:  # its hash table and its dataset (retraining: load it)
            table = self._reader.stored_hashes(self._content(m.provenance.hashes_blob))
            if retrain.roots_key(table) != m.provenance.hashes_blob:
                raise IntegrityError(f"version {m.id}: its table of recorded hashes is corrupted")
            return retrain.verify_dataset(self, str(m.provenance.recipe["data"]))
        if m.update is None:
            for name in m.orders:  # a recorded order names exactly the model's tensors
                self._baseline_order(m, name)
            return m.num_tensors
        chain.model_index(self, vid)  # what it inherits fits together (orders, deltas, adds)
        checked += sum(g.count * len(g.schema.tensors) for g in m.groups)
        if m.update.changed:  # its tables re-read and re-hashed (the cache is not trusted),
            chain.read_delta_blob(self, m)  # then decoding checks every decoded tensor's hash
            got = chain.recover(self, vid, set(m.update.changed), verify=True)
            checked += sum(len(got[name]) for name in m.update.changed)
        return checked

    def check(self, version: str | None = None) -> VerifyReport:
        """``verify`` that goes on past a problem: every version (or one) re-hashed, and,
        for the whole store, every content record's reference count recomputed from the
        manifests and datasets that use it. Returns what it found and never raises for a
        damaged store: a record that cannot be decoded is one problem among the others.
        A read-only store first catches up with its writer (see ``_refresh``)."""
        self._check_open()
        if self.readonly:
            self._refresh()
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
            rec = self._content(blob)
            rec.refs -= n
            if rec.refs > 0:
                puts.append(("content", blob, rec.encode()))
            else:
                deletes.append(("content", blob))
        try:
            self.catalog.commit(puts, deletes)
        finally:  # a commit that raised may still be durable: never serve the old records
            for vid in doomed:
                self._manifests.pop(vid, None)
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
        return transfer.transfer(self, to, ref, progress=progress)

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
        progress: bool | None = None,
    ) -> str:
        """Saves the ``.safetensors`` files of ``directory`` (one model each, named after
        the file) as a new version: a baseline, or an update of ``parent``."""
        self._check_writable()
        files = exchange.exported_files(Path(_args.path(directory)))
        return self.save(exchange.read_models(files), approach=approach, parent=parent, ref=ref,
                         message=message, tolerance=tolerance, progress=progress)  # fmt: skip

    # -- datasets ----------------------------------------------------------
    def put_dataset(self, data: Any, *, progress: bool | None = None) -> str:
        """Stores a dataset ({name: {tensor name: tensor}}, e.g. per model its inputs and
        targets) and returns its id for ``mmcore.Recipe(data=...)``. Content-addressed:
        the same names and bytes stored again cost nothing and give the same id."""
        self._check_writable()
        _args.optional_flag(progress, "progress")
        with progress_bar(_count(data), "storing dataset", progress, unit="entry") as bar:
            return retrain.put_dataset(self, data, bar)  # (its commit: a transaction)

    def datasets(self) -> dict[str, dict[str, Any]]:
        """{dataset id: its entries, logical and stored bytes, and the versions using it}."""
        self._check_open()
        out = {}
        for key, raw in self.catalog.scan("datasets"):
            rec = DatasetRecord.decode(raw)
            out[key.decode()] = {"entries": len(rec.names), "logical_bytes": rec.logical_bytes,
                                 "stored_bytes": rec.stored_bytes,
                                 "used_by": retrain.users(self, rec.id)}  # fmt: skip
        return out

    def load_dataset(
        self, dataset: str, *, device: str | torch.device = "cpu"
    ) -> dict[str, StateDict]:
        """A stored dataset, every tensor hash-checked."""
        self._check_open()
        return retrain.load_dataset(self, dataset, _args.device(device))

    def delete_dataset(self, dataset: str) -> None:
        """Deletes a dataset no version uses; ``gc()`` then reclaims its bytes."""
        self._check_writable()
        with self.catalog.transaction():
            retrain.delete_dataset(self, dataset)

    def gc(self, *, compact_below: float = 0.5, progress: bool | None = None,
           grace_s: float | None = None) -> int:  # fmt: skip
        """Deletes pack files nothing references (deleted versions, interrupted saves),
        then rewrites every pack whose live bytes are below ``compact_below`` of its size
        (0: never; above 1: every pack) with only those bytes. Crash-safe: a kill at any
        point loses no referenced byte, and the next gc reclaims what it left.

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
        with self.catalog.transaction():
            return reclaimed + compact.compact(self, float(compact_below), progress)

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyStoreError(
                "this store was opened read-only; reopen it with readonly=False"
            )

    def stored_bytes(self) -> int:
        """Bytes the whole store occupies on disk (or in its bucket): packs plus catalog."""
        return self.tier.total_bytes() + self.catalog.approximate_bytes()


def _stack_of(names: list[str], buf: torch.Tensor, schema: Schema, device: torch.device) -> Stack:
    """The stack viewing ``buf`` (records of ``schema``), moved to ``device`` in one copy."""
    stack = Stack(names, record_columns(buf, schema, len(names)), records=(buf, schema))
    return stack.to(device)


def _stack_parts(stacks: Any) -> list[tuple[Any, Any]]:
    if isinstance(stacks, Stack):
        return [(stacks.names, stacks.params)]
    if isinstance(stacks, StackedSet):
        return [(g.names, g.params) for g in stacks.groups]
    raise InvalidModelSetError(
        "save_stacked takes names and {tensor name: [models, ...] tensor}, or a Stack or "
        f"StackedSet alone; got {type(stacks).__name__} and no params"
    )


def _refuse_missing(vid: str, missing: list[str]) -> None:
    if missing:
        raise ModelNotFoundError(
            f"version {vid} has no model(s) {', '.join(map(repr, missing[:5]))}; "
            "store.info(version) describes the version"
        )


def _count(models: Any) -> int | None:
    try:
        return len(models)
    except TypeError:
        return None
