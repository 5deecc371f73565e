"""The ``mmcore`` command: inspect, measure, verify and demo a store."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from . import open as open_store
from ._units import human_bytes
from .api import ModelStore
from .errors import MMCoreError
from .versions import VersionInfo


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] | None = None
) -> str:
    right = right or set()
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _version_rows(infos: Sequence[VersionInfo]) -> str:
    rows = [
        [
            i.id,
            i.created.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            i.approach,
            f"{i.num_models:,}",
            human_bytes(i.logical_bytes),
            human_bytes(i.stored_bytes),
            ", ".join(i.refs),
            i.parent or "",
        ]
        for i in infos
    ]
    return _table(
        ["version", "created", "approach", "models", "params", "stored", "refs", "parent"],
        rows,
        {3, 4, 5},
    )


def _open_ro(path: str) -> ModelStore:
    return open_store(path, readonly=True, create=False)


def cmd_info(args: argparse.Namespace) -> int:
    with _open_ro(args.path) as store:
        if args.version is None:
            versions = store.versions()
            refs = store.refs()
            print(f"store      {store.path}")
            print(f"versions   {len(versions)}")
            print(f"refs       {', '.join(f'{r} -> {v}' for r, v in sorted(refs.items())) or '-'}")
            print(f"on disk    {human_bytes(store.stored_bytes())}")
            if versions:
                print()
                print(_version_rows(versions))
            return 0
        info = store.info(args.version)
        manifest = store.manifest(info.id)
        print(f"version    {info.id}")
        print(f"approach   {info.approach}")
        print(f"parent     {info.parent or '-'}")
        print(f"created    {info.created.astimezone().isoformat(timespec='seconds')}")
        print(f"refs       {', '.join(info.refs) or '-'}")
        print(f"models     {info.num_models:,}")
        print(f"tensors    {info.num_tensors:,}")
        print(f"params     {human_bytes(info.logical_bytes)}")
        ratio = info.stored_bytes / info.logical_bytes if info.logical_bytes else 0.0
        print(f"stored     {human_bytes(info.stored_bytes)} ({ratio:.3f}x the parameter bytes)")
        if info.message:
            print(f"message    {info.message}")
        if info.approach == "update":
            c = info.changes
            print(f"depth      {info.depth} (versions back to the baseline; deltas per model "
                  f"at most {info.max_chain}, here {c.get('max_delta_chain', 0)})")  # fmt: skip
            if info.max_recovery is not None:
                print(f"keyframes  {c.get('keyframes', 0):,} of the changed models stored whole again "
                      f"(recovery bound: {info.max_recovery:g}x a whole read)")  # fmt: skip
            print(f"tolerance  {info.tolerance if info.tolerance is not None else 'none (exact)'}")
            print(f"changes    {c.get('unchanged', 0):,} unchanged, {c.get('delta', 0):,} as deltas, "
                  f"{c.get('whole', 0):,} whole ({c.get('added', 0):,} added), "
                  f"{c.get('removed', 0):,} removed")  # fmt: skip
            if manifest.update is not None and manifest.update.derived:
                sources = sorted(set(manifest.update.derived.values()))
                stored = (
                    f": {human_bytes(c['derived_bytes'])} of parameters in "
                    f"{human_bytes(c['derived_payload_bytes'])}"
                    if "derived_bytes" in c
                    else ""
                )
                print(f"derived    {len(manifest.update.derived):,} new model(s) stored as deltas of "
                      f"the parent's {', '.join(map(repr, sources[:3]))}"
                      f"{' ...' if len(sources) > 3 else ''}{stored}")  # fmt: skip
            print(f"bytes      {human_bytes(c.get('payload_bytes', 0))} payload, "
                  f"{human_bytes(c.get('metadata_bytes', 0))} tables and hashes, "
                  f"{human_bytes(info.stored_bytes - c.get('payload_bytes', 0) - c.get('metadata_bytes', 0))} "
                  "manifest and pack overhead")  # fmt: skip
        if manifest.provenance is not None:
            pv, c = manifest.provenance, info.changes
            recipe = pv.recipe
            print(f"recipe     trainer {recipe['trainer']} (code {pv.code_hash[:12]}), seed {recipe['seed']}, "
                  f"params {recipe.get('params') or {}}")  # fmt: skip
            print(f"retrains   {c.get('retrained', 0):,} model(s) of the parent, {c.get('unchanged', 0):,} unchanged; "
                  f"{info.depth} provenance version(s) back to stored parameters")  # fmt: skip
            print(f"dataset    {recipe['data'][:16]}... ({human_bytes(c.get('dataset_bytes', 0))}, "
                  "stored apart, shared by every version using it)")  # fmt: skip
            env = pv.environment
            print(
                f"saved on   torch {env.get('torch')}, {env.get('device')} ({env.get('device_name')})"
            )
        shared = [g for g in manifest.groups if g.shared is not None]
        if shared:
            tensors = sum(g.count * len(g.shared.tensors) for g in shared if g.shared)
            print(f"shared     {tensors:,} tensors equal across models stored once per value: "
                  f"{human_bytes(sum(g.shared_saved() for g in shared))} not stored")  # fmt: skip
        plain, coded = store.storage.compression(manifest.groups)
        if plain:
            print(f"compressed {human_bytes(plain)} of records stored in {human_bytes(coded)} "
                  f"({coded / plain:.3f}x, {human_bytes(plain - coded)} saved)")  # fmt: skip
        if not manifest.groups:
            return 0
        print()
        rows = []
        for gi, group in enumerate(manifest.groups):
            first = group.names[0] if group.names else manifest.models[group.positions()[0]]
            rows.append([str(gi), f"{group.count:,}", str(len(group.schema.tensors)),
                         human_bytes(group.schema.stride), first])  # fmt: skip
        print(_table(["schema", "models", "tensors", "per model", "first model"], rows, {1, 2, 3}))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with _open_ro(args.path) as store:
        infos = store.log(args.ref)
        print(_version_rows(infos) if infos else "no versions")
    return 0


def _cannot_verify(exc: Exception) -> int:
    missing = isinstance(exc.__cause__, ModuleNotFoundError)
    what = "the native module is missing" if missing else "the native module cannot be loaded"
    print(f"mmcore: error: {what}: {exc}", file=sys.stderr)
    print("mmcore: nothing was verified (this says nothing about the store)", file=sys.stderr)
    return 3


def cmd_verify(args: argparse.Namespace) -> int:
    """Every problem found, not only the first: each damaged version, and (for the
    whole store) reference counts that differ from what the versions use. Exit 1:
    damage found; exit 3: nothing checked, the native module is missing or broken
    (re-hashing needs it; it is never reported as damage to the store)."""
    from ._native import core
    from .errors import NativeModuleError

    try:
        core()
    except NativeModuleError as exc:
        return _cannot_verify(exc)
    with _open_ro(args.path) as store:
        t0 = time.perf_counter()
        ids = [store.resolve(args.version)] if args.version else [v.id for v in store.versions()]
        total = nbytes = 0
        bad = 0
        for vid in ids:
            report = store.check(vid)
            if isinstance(report.first_error, NativeModuleError):
                return _cannot_verify(report.first_error)
            if report.problems:
                bad += 1
                for problem in report.problems:
                    print(f"CORRUPT  {problem}", file=sys.stderr)
                continue
            total += report.tensors
            nbytes += store.info(vid).logical_bytes
            print(f"ok       {vid}")
        refs = [] if args.version else store.check_references()
        for problem in refs:
            print(f"CORRUPT  {problem}", file=sys.stderr)
        dt = time.perf_counter() - t0
        print(f"verified {total:,} tensors ({human_bytes(nbytes)}) in {len(ids) - bad} of {len(ids)} "
              f"version(s) in {dt:.2f} s; {bad} damaged version(s), {len(refs)} reference problem(s)")  # fmt: skip
    return 1 if bad or refs else 0


def cmd_du(args: argparse.Namespace) -> int:
    """Where a store's bytes go: versions by approach (their own bytes), datasets
    apart, and the total on disk (packs, catalog, and what gc would reclaim)."""
    with _open_ro(args.path) as store:
        infos = store.versions()
        rows = []
        for approach in ("baseline", "update", "provenance"):
            mine = [i for i in infos if i.approach == approach]
            if mine:
                rows.append([f"{approach} versions", f"{len(mine):,}", human_bytes(sum(i.logical_bytes for i in mine)),
                             human_bytes(sum(i.stored_bytes for i in mine))])  # fmt: skip
        datasets = store.datasets()
        if datasets:
            rows.append(["datasets", f"{len(datasets):,}",
                         human_bytes(sum(d["logical_bytes"] for d in datasets.values())),
                         human_bytes(sum(d["stored_bytes"] for d in datasets.values()))])  # fmt: skip
        print(
            _table(["", "count", "logical", "stored"], rows, {1, 2, 3}) if rows else "empty store"
        )
        per = []
        shared = False
        manifests = {i.id: store.manifest(i.id) for i in infos}  # (each read once)
        coded_blobs: dict[bytes, tuple[int, int]] = {}
        for i in infos:
            m = manifests[i.id]
            c = i.changes
            if m.update is not None:
                payload, meta = c.get("payload_bytes", 0), c.get("metadata_bytes", 0)
            elif m.provenance is not None:
                payload, meta = 0, c.get("roots_bytes", 0)
            else:
                plain, coded = store.storage.compression(m.groups, coded_blobs)
                payload = sum(g.payload_bytes() for g in m.groups) - plain + coded
                meta = sum(g.hash_bytes() for g in m.groups)
            # More than it stored: its blobs equal ones stored before, referenced, not written
            # again; its own bytes are its manifest, and the blobs count where they were stored.
            own = [human_bytes(payload), human_bytes(meta)]
            if payload + meta > i.stored_bytes:
                own, shared = ["shared", "shared"], True
            per.append([i.id, i.approach, human_bytes(i.logical_bytes), human_bytes(i.stored_bytes),
                        *own, human_bytes(c["dataset_bytes"]) if "dataset_bytes" in c else "-"])  # fmt: skip
        print(
            f"on disk    {human_bytes(store.stored_bytes())} (packs and catalog; `gc` reclaims unreferenced packs)"
        )
        updates = [i for i in infos if i.approach == "update"]
        if updates:  # what storing only what changed saved, and how much of it derived models
            logical = sum(i.logical_bytes for i in updates)
            stored = sum(i.stored_bytes for i in updates)
            line = (f"saved      by updates: {human_bytes(logical)} of parameters stored in "
                    f"{human_bytes(stored)} ({human_bytes(max(logical - stored, 0))} saved)")  # fmt: skip
            derived = [i.changes for i in updates if i.changes.get("derived_bytes")]
            if derived:
                d_logical = sum(c["derived_bytes"] for c in derived)
                d_stored = sum(c["derived_payload_bytes"] for c in derived)
                line += (f"; of them models derived from another: {human_bytes(d_logical)} in "
                         f"{human_bytes(d_stored)}")  # fmt: skip
            print(line)
        groups = [g for m in manifests.values() for g in m.groups if g.shared is not None]
        if groups:  # what storing equal tensors once saved (in every version's own count)
            print(f"saved      by shared tensors: {human_bytes(sum(g.shared_saved() for g in groups))} "
                  f"of parameters not stored, in {len(groups):,} group(s)")  # fmt: skip
        plain, coded = store.storage.compression(
            [g for m in manifests.values() for g in m.groups], coded_blobs
        )
        if plain:  # what coding whole models saved (each blob once)
            print(f"saved      by compression: {human_bytes(plain)} of records stored in "
                  f"{human_bytes(coded)} ({human_bytes(plain - coded)} saved)")  # fmt: skip
        for did, d in datasets.items():
            users = ", ".join(d["used_by"][:3]) + (" ..." if len(d["used_by"]) > 3 else "")
            print(f"dataset    {did[:16]}  {d['entries']:,} entries, {human_bytes(d['stored_bytes'])}, "
                  f"used by {users or 'no version'}")  # fmt: skip
        if per:
            print()
            print(_table(["version", "approach", "logical", "stored", "payload", "hashes+tables", "dataset"],
                         per, {2, 3, 4, 5, 6}))  # fmt: skip
        if shared:
            print("shared: the same bytes as a version saved before, stored once (counted there); "
                  "this version stores only its manifest")  # fmt: skip
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_store(args.path, create=False) as store:
        gone = store.delete(args.version, cascade=args.cascade)
        print(
            f"deleted {len(gone):,} version(s): {', '.join(gone)}; `mmcore gc {args.path}` reclaims their bytes"
        )
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    with open_store(args.path, create=False) as store:
        store.rebase(args.version, parent=args.parent, compress=args.compress)
        info = store.info(args.version)
        onto = f"an update of {info.parent}" if info.parent else "a baseline"
        print(f"rebased {info.id}: now {onto}, {human_bytes(info.stored_bytes)} stored")
    return 0


def cmd_refs(args: argparse.Namespace) -> int:
    if args.delete:
        with open_store(args.path, create=False) as store:
            for name in args.delete:
                head = store.refs().get(name)
                store.delete_ref(name)
                print(f"deleted ref {name} (it pointed at {head}; the version stays)")
        return 0
    with _open_ro(args.path) as store:
        refs = store.refs()
        rows = [[name, vid] for name, vid in sorted(refs.items())]
        print(_table(["ref", "version"], rows) if rows else "no refs")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with open_store(args.path, create=False) as store:
        before = store.stored_bytes()
        freed = store.gc(compress=args.compress)
        print(
            f"reclaimed {human_bytes(freed)} ({human_bytes(before)} -> {human_bytes(store.stored_bytes())} on disk)"
        )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """push and pull: both copy from the first store to the second."""
    with _open_ro(args.source) as src, open_store(args.dest) as dst:
        got = src.push(dst, args.ref)
    moved = f"ref {got.ref} -> {got.head}" if got.ref else "every ref"
    print(f"copied {got.versions:,} version(s) and {got.datasets:,} dataset(s): "
          f"{got.blobs_copied:,} blob(s), {human_bytes(got.bytes_copied)}; "
          f"{got.blobs_shared:,} blob(s) {args.dest} held already; {moved}")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open_ro(args.path) as store:
        files = store.export(args.version, args.directory, models=args.model or None)
        print(f"exported {len(files):,} model(s) to {args.directory}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with open_store(args.path, create=False) as store:
        vid = store.import_(args.directory, approach="update" if args.parent else "baseline",
                            parent=args.parent, ref=args.ref, message=args.message,
                            compress=args.compress)  # fmt: skip
        info = store.info(vid)
        print(
            f"imported {info.num_models:,} model(s) from {args.directory} as {info.approach} version {vid}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo  # torch and the core dependencies only: never a bench extra

    return demo.run(cells=args.cells, store_path=Path(args.store), compare=not args.no_compare,
                    repeat=args.repeat)  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


_PATH = "the store's directory, or s3://BUCKET/PREFIX (AWS_* environment variables)"
_VERSION = "a version id, a unique prefix of one (4+ hex digits), or a ref"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcore", description="Save and recover whole sets of models.")
    p.add_argument("--version", action="version", version=f"mmcore {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="a store's versions, or one version in detail")
    s.add_argument("path", help=_PATH)
    s.add_argument("version", nargs="?", help=_VERSION + "; without: every version and ref")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("log", help="versions reachable from a ref (all without one), newest first")
    s.add_argument("path", help=_PATH)
    s.add_argument("ref", nargs="?", help="a ref name (`mmcore refs PATH` lists them)")
    s.set_defaults(fn=cmd_log)
    s = sub.add_parser("verify", help="re-hash every stored byte of a version (or all)")
    s.add_argument("path", help=_PATH)
    s.add_argument("version", nargs="?", help=_VERSION + "; without: every version")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser(
        "delete", help="delete a version (with --cascade, every version stored against it)"
    )
    s.add_argument("path", help=_PATH)
    s.add_argument("version", help=_VERSION)
    s.add_argument("--cascade", action="store_true", help="also delete the versions that need it")
    s.set_defaults(fn=cmd_delete)
    s = sub.add_parser(
        "rebase", help="rewrite a version as a baseline (or an update of --parent), same id"
    )
    s.add_argument("path", help=_PATH)
    s.add_argument("version", help=_VERSION)
    s.add_argument("--parent", help="store it as a lossless update of this version instead")
    s.add_argument("--compress", action="store_true",
                   help="code the models it stores whole (lossless byte planes)")  # fmt: skip
    s.set_defaults(fn=cmd_rebase)
    s = sub.add_parser("refs", help="the store's refs and the versions they point at; --delete")
    s.add_argument("path", help=_PATH)
    s.add_argument("--delete", action="append", metavar="REF",
                   help="remove this ref (repeatable); the version it points at stays")  # fmt: skip
    s.set_defaults(fn=cmd_refs)
    s = sub.add_parser("gc", help="delete pack files nothing references; print the bytes reclaimed")
    s.add_argument("path", help=_PATH)
    s.add_argument("--compress", action="store_true",
                   help="also code the models stored plain (lossless), as save(compress=True) does")  # fmt: skip
    s.set_defaults(fn=cmd_gc)
    for name, what in (("push", "copy to DEST"), ("pull", "copy from SOURCE")):
        s = sub.add_parser(
            name, help=f"{what} the versions DEST lacks (those REF needs), and the refs; "
            "only missing blobs travel"
        )  # fmt: skip
        s.add_argument("source", help="the store to copy from (a directory or s3://BUCKET/PREFIX)")
        s.add_argument("dest", help="the store to copy to (created if missing)")
        s.add_argument("ref", nargs="?", help="copy what this ref needs and move it (default: all)")
        s.set_defaults(fn=cmd_transfer)
    s = sub.add_parser("export", help="write a version's models as DIRECTORY/<model>.safetensors")
    s.add_argument("path", help=_PATH)
    s.add_argument("version", help=_VERSION)
    s.add_argument("directory", help="where the files go (created if missing; no file is replaced)")
    s.add_argument("--model", action="append", help="export only this model (repeatable)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser(
        "import", help="save DIRECTORY's .safetensors files (a model each) as a version"
    )
    s.add_argument("path", help=_PATH)
    s.add_argument("directory", help="a directory of <model>.safetensors files")
    s.add_argument("--parent", help="store an update of this version instead of a baseline")
    s.add_argument("--ref", help="move this ref to the new version")
    s.add_argument("--message", help="a note stored with the version")
    s.add_argument("--compress", action="store_true",
                   help="code the models it stores whole (lossless byte planes)")  # fmt: skip
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser("du", help="a store's bytes: versions by approach, datasets, total on disk")
    s.add_argument("path", help=_PATH)
    s.set_defaults(fn=cmd_du)
    from . import doctor

    s = sub.add_parser("doctor", help="versions, CUDA kernels and device, nvCOMP, store formats")
    s.set_defaults(fn=doctor.main)
    s = sub.add_parser(
        "demo", help="save and recover the battery model set; compare with other tools"
    )
    s.add_argument(
        "--cells", type=_positive, default=10_000, help="battery cells (models) in the set"
    )
    s.add_argument(
        "--store", default="mmcore-demo.mm", help="store directory (default ./mmcore-demo.mm)"
    )
    s.add_argument("--repeat", type=_positive, default=3, help="runs per timing in the comparison")
    s.add_argument("--no-compare", action="store_true", help="skip the comparison with other tools")
    s.set_defaults(fn=cmd_demo)
    return p


# The library's advice names its Python calls; on the command line, the CLI's own.
_CLI_ADVICE = (
    ("pass cascade=True", "pass --cascade"),
    ("store.delete_ref(name)", "`mmcore refs {path} --delete NAME`"),
    ("store.info(version) describes the version", "`mmcore info {path} VERSION` describes it"),
    ("store.datasets() lists them", "`mmcore du {path}` lists them"),
    ("export the other models with models=[...]", "export the other models with --model NAME"),
    ("or open this one with mmcore.open(path, readonly=True)",
     "or use a command that only reads it meanwhile (info, log, refs, verify, du, export)"),
)  # fmt: skip


def _cli_message(exc: MMCoreError, path: str | None) -> str:
    text = str(exc)
    for python, cli in _CLI_ADVICE:
        text = text.replace(python, cli.format(path=path or "PATH"))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except MMCoreError as exc:
        print(f"mmcore: error: {_cli_message(exc, getattr(args, 'path', None))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`mmcore info PATH | head`): stop quietly
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # as if killed by SIGPIPE, like other command-line tools
    except KeyboardInterrupt:
        print("mmcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
