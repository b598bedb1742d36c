"""KV block store: Full Blocks in a directory of a shared file system."""

from dualpath.storage.block_file import BlockError, BlockGeometry, fingerprint
from dualpath.storage.nic import NicSnapshot, StorageNic
from dualpath.storage.store import BlockStore, StoreMismatch

__all__ = ["BlockError", "BlockGeometry", "BlockStore", "NicSnapshot", "StorageNic",
           "StoreMismatch", "fingerprint"]
