"""The FF-A endpoint handler (:mod:`.handler`) and its partition plugin API (:mod:`.partition`).

Modules, one job each: :mod:`.defs` (ABI constants), :mod:`.options` (config),
:mod:`.descriptors` (memory transaction and partition info layouts),
:mod:`.ledger` (transactions and handles), :mod:`.mailbox` (RX/TX ownership),
:mod:`.notify` (notification bitmaps), :mod:`.endpoint` (each call's logic),
:mod:`.echo`, :mod:`.storage` and :mod:`.socket_backend` (the shipped partitions).
"""

from .handler import FfaHandler
from .partition import Partition, PartitionContext, PartitionSpec, SharedMemory

__all__ = ["FfaHandler", "Partition", "PartitionContext", "PartitionSpec", "SharedMemory"]
