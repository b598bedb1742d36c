"""The DualPath transfer engine (C++, csrc/transfer): batched copies between registered regions."""

from dualpath.transfer.engine import Handle, TransferBatch, TransferEngine

__all__ = ["Handle", "TransferBatch", "TransferEngine"]
