"""kvpager: the paged, compressed KV cache library (libkvpager.so.1) from Python, on ctypes and numpy.

    import numpy as np, kvpager
    shape = kvpager.Shape(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64)
    with kvpager.Pool("mem=64MiB") as pool, pool.tenant("alice", "window=128") as tenant, \\
            tenant.sequence(shape) as seq:
        seq.append(0, 0, k, v)         # k, v: float32 [n_kv_heads][head_dim] (one token at pos 0)
        out = seq.attend(0, q)         # q: float32 [n_heads][head_dim]
        seq.step()

The library is $KVPAGER_LIB, else libkvpager.so.1 next to this package, else the system's. Arrays are
checked before a call (dtype, C order, shape against the sequence's shape): a wrong one raises
ValueError naming it. A failing call raises the kvpager.Error subclass of its status.
"""

from ._library import ABI_MAJOR, ABI_MINOR
from ._library import path as library_path
from .cache import Gathered, HeadLevel, Pool, RemoteStats, RopeLayout, Sequence, Shape, Stats, Tenant
from .errors import (AbiMismatch, Busy, Corrupt, Error, InvalidArgument, OutOfMemory, PermissionDenied,
                     SpillIOError, Unsupported)
from .standalone import Codec, Policy

__all__ = [
    "ABI_MAJOR", "ABI_MINOR", "library_path",
    "Pool", "Tenant", "Sequence", "Shape", "RopeLayout", "Stats", "RemoteStats", "HeadLevel", "Gathered",
    "Codec", "Policy",
    "Error", "InvalidArgument", "OutOfMemory", "SpillIOError", "Corrupt", "PermissionDenied",
    "Unsupported", "AbiMismatch", "Busy",
]
