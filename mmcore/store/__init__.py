"""The store: a RocksDB catalog plus a payload tier of append-only pack files."""

from __future__ import annotations

from .catalog import Catalog
from .layout import StoreLayout
from .packs import LocalPackTier, PackWriter, PayloadTier

__all__ = ["Catalog", "LocalPackTier", "PackWriter", "PayloadTier", "StoreLayout"]
