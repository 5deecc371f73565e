"""Typed errors. Each message says what was wrong and what to do."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager


class MMCoreError(Exception):
    """Base class of every error mmcore raises on purpose."""


class NativeModuleError(MMCoreError, ImportError):
    """The compiled extension is missing or cannot be loaded."""


class InvalidModelSetError(MMCoreError, ValueError):
    """The models given to ``save`` are not a valid set (empty, bad names, non-tensors...)."""


class InvalidArgumentError(MMCoreError, ValueError):
    """An argument has a value mmcore does not accept (unknown approach, bad device...)."""


class KernelError(MMCoreError, RuntimeError):
    """A native kernel failed to launch or faulted while it ran; the message names
    the kernel and carries the CUDA error."""


class StoreError(MMCoreError):
    """Problems with the store directory itself."""


class NotAStoreError(StoreError):
    """The path exists but is not an mmcore store (a file, or a foreign directory)."""


class StoreLockedError(StoreError):
    """Another process holds the store open for writing."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened read-only."""


class FormatVersionError(StoreError):
    """The store or a record was written by a newer, unknown format version."""


class CorruptRecordError(StoreError):
    """A catalog record cannot be decoded: the catalog is damaged."""


class RemoteStoreError(StoreError):
    """A request to an object store failed (after the client's retries): the message
    names the operation and the object, never a credential."""


class ConflictError(StoreError):
    """Another writer committed a change to records this operation read or wrote, since
    it read them: nothing of this operation is visible; running it again is safe."""


class RefConflictError(ConflictError):
    """Another writer moved the ref this save moves: nothing of the save is visible.
    ``head`` is the ref's new head; save against it (or to another ref) to retry."""

    def __init__(self, message: str, *, ref: str, head: str | None) -> None:
        super().__init__(message)
        self.ref = ref
        self.head = head


class DeviceUnavailableError(InvalidArgumentError):
    """The device asked for does not exist or is not usable on this machine."""


class NotFoundError(MMCoreError, KeyError):
    """Base for lookups that found nothing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VersionNotFoundError(NotFoundError):
    """No version with this id (or unique id prefix) exists."""


class RefNotFoundError(NotFoundError):
    """No ref with this name exists."""


class ModelNotFoundError(NotFoundError):
    """The version holds no model with this name."""


class DatasetNotFoundError(NotFoundError):
    """No dataset with this id is in the store."""


class IntegrityError(MMCoreError):
    """Stored bytes do not match their recorded hash."""

    def __init__(self, message: str, *, model: str | None = None, tensor: str | None = None,
                 problems: list[str] | None = None):  # fmt: skip
        super().__init__(message)
        self.model = model
        self.tensor = tensor
        self.problems = problems if problems is not None else [message]  # verify: every one found


class PackMissingError(IntegrityError):
    """A pack file the catalog names is not there. A read-only store opened before a
    writer's ``gc`` sees this for packs gc removed; it reopens its catalog and tries
    once more before raising it."""


class ProvenanceError(MMCoreError):
    """A provenance recipe cannot be run as asked (data missing, a trainer's result
    of the wrong shape...)."""


class TrainerNotFoundError(ProvenanceError, LookupError):
    """No trainer of that name is registered in this process."""


class ProvenanceMismatchError(ProvenanceError):
    """Retraining did not reproduce the recorded models bit for bit; ``models`` names them."""

    def __init__(self, message: str, *, models: list[str] | None = None):
        super().__init__(message)
        self.models = models or []


class DependentsError(InvalidArgumentError):
    """A version cannot go alone: other versions are stored against it (``dependents``)."""

    def __init__(self, message: str, *, dependents: list[str] | None = None):
        super().__init__(message)
        self.dependents = dependents or []


@contextmanager
def decoding(vid: str) -> Iterator[None]:
    """Errors from stored records that no check foresaw come out typed, never as
    torch's, struct's or the OS's."""
    try:
        yield
    except MMCoreError:
        raise
    except OSError as exc:
        raise StoreError(f"version {vid}: reading its bytes failed ({exc})") from exc
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, OverflowError,
            struct.error) as exc:  # fmt: skip
        raise CorruptRecordError(
            f"version {vid}: its records cannot be decoded ({type(exc).__name__}: {exc}); the "
            "store is damaged (`mmcore verify` lists what), or this is a bug in mmcore: please "
            "report it"
        ) from exc
