"""Shared storage (local dir or pyarrow URI) and verified, atomically published checkpoint bundles."""

from clusterft.storage.checkpoint import BundleInfo, BundleStore, bundle_name
from clusterft.storage.fs import Storage

__all__ = ["BundleInfo", "BundleStore", "Storage", "bundle_name"]
