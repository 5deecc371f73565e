"""The store directory: a marker file, the catalog and the packs.

``MMCORE`` (JSON) names the format version; it is written last when a store is
created, so a directory without it is never mistaken for a store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatVersionError, NotAStoreError, StoreError

FORMAT_VERSION = 1
MARKER = "MMCORE"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreLayout:
    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def check_or_create(self, *, create: bool) -> list[Path] | None:
        """Checks an existing store, or creates the directories and the marker of a new one.

        For a new store, returns the directories this call created (the root and
        missing parents; empty when the root existed), else None. Nothing of a new
        store is durable yet: call ``make_durable`` once the catalog exists too.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise NotAStoreError(
                f"{root} is a file, not an mmcore store directory; pick another path"
            )
        if self.marker.is_file():
            self._check_marker()
            return None
        if not create:
            raise NotAStoreError(f"{root} is not an mmcore store (no {MARKER} file)")
        if root.exists() and any(root.iterdir()):
            raise NotAStoreError(
                f"{root} is a non-empty directory without an {MARKER} file: not an mmcore store. "
                "Give a new or empty directory to create one."
            )
        absolute = root.absolute()
        created = [d for d in (absolute, *absolute.parents) if not d.exists()]
        try:
            self.packs.mkdir(parents=True, exist_ok=True)
            tmp = root / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, "kind": "mmcore-store"}) + "\n")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.marker)
        except OSError as exc:
            raise StoreError(f"cannot create a store at {root}: {exc}") from exc
        return created

    def make_durable(self, created: list[Path]) -> None:
        """Fsyncs the root (its marker, packs and catalog entries) and the parent of every
        directory this store created, so a power cut after the first save cannot lose
        the store itself."""
        try:
            fsync_dir(self.root)
            for directory in created:
                fsync_dir(directory.parent)
        except OSError as exc:
            raise StoreError(f"cannot make the new store at {self.root} durable: {exc}") from exc

    def _check_marker(self) -> None:
        try:
            info = json.loads(self.marker.read_text())
            version = int(info["format"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NotAStoreError(f"{self.marker} is unreadable: {exc}") from exc
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{self.root} was written by a newer mmcore (store format {version}; this "
                f"mmcore reads up to {FORMAT_VERSION}). Upgrade mmcore to open it."
            )
