"""What ``ModelStore.info`` and ``log`` report about a version."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .manifest import Manifest


@dataclass(frozen=True)
class VersionInfo:
    id: str
    approach: str
    parent: str | None
    created: datetime
    num_models: int
    num_tensors: int
    logical_bytes: int
    stored_bytes: int
    refs: tuple[str, ...]
    message: str | None
    depth: int = 0  # update versions back to the baseline
    tolerance: float | None = None  # an update's bound; None: exact
    max_chain: int | None = None
    max_recovery: float | None = None  # an update's keyframe bound (None: max_chain only)
    changes: dict[str, int] = field(default_factory=dict)  # an update's or provenance version's
    # model counts and bytes (a provenance version's dataset_bytes: its data, stored apart)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["created"] = self.created.isoformat()
        d["refs"] = list(self.refs)
        d["changes"] = dict(self.changes)
        return d

    @classmethod
    def of(cls, m: Manifest, refs: tuple[str, ...], depth: int | None = None) -> VersionInfo:
        """``depth``: as the chain is now (the manifest's is as it was saved)."""
        pv = m.provenance
        if pv is not None:
            stats = dict(pv.stats)
            return cls(
                id=m.id, approach=m.approach, parent=m.parent,
                created=datetime.fromtimestamp(m.created, tz=timezone.utc),
                num_models=stats.get("models", 0), num_tensors=stats.get("tensors", 0),
                logical_bytes=m.logical_bytes, stored_bytes=m.stored_bytes, refs=refs,
                message=m.message, depth=pv.depth if depth is None else depth, changes=stats,
            )  # fmt: skip
        up = m.update
        stats = {} if up is None else dict(up.stats)
        return cls(
            id=m.id, approach=m.approach, parent=m.parent,
            created=datetime.fromtimestamp(m.created, tz=timezone.utc),
            num_models=len(m.models) if up is None else stats.get("models", 0),
            num_tensors=m.num_tensors if up is None else stats.get("tensors", 0),
            logical_bytes=m.logical_bytes, stored_bytes=m.stored_bytes, refs=refs,
            message=m.message, depth=0 if up is None else up.depth if depth is None else depth,
            tolerance=None if up is None else up.tolerance,
            max_chain=None if up is None else up.max_chain,
            max_recovery=None if up is None else up.max_recovery, changes=stats,
        )  # fmt: skip


class VerifyReport(int):
    """What ``verify`` / ``check`` found. As an int: the tensors re-hashed (what
    ``verify`` returned before it collected problems). ``problems`` lists every one
    found (empty: the store, or the version, is whole); ``versions`` counts the
    versions that passed."""

    problems: list[str]
    versions: int
    first_error: Exception | None

    def __new__(cls, tensors: int = 0, versions: int = 0, problems: list[str] | None = None,
                first_error: Exception | None = None) -> VerifyReport:  # fmt: skip
        report = super().__new__(cls, tensors)
        report.versions = versions
        report.problems = list(problems or [])
        report.first_error = first_error
        return report

    @property
    def tensors(self) -> int:
        return int(self)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __repr__(self) -> str:
        return f"VerifyReport(tensors={int(self)}, versions={self.versions}, problems={self.problems!r})"
