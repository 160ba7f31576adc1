"""Argument checks made before a call reaches C: a wrong argument raises ValueError naming it."""

import operator

import numpy as np

FLOAT32 = np.dtype(np.float32)
INT32 = np.dtype(np.int32)
UINT32_LIMIT = 1 << 32


def array(name, a, dtype, shape, writable=False):
    """a itself when it is an ndarray of dtype (native byte order), C-contiguous, aligned, of shape."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array of {dtype}, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: dtype is {a.dtype}, expected {dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: shape is {a.shape}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: not C-contiguous (use numpy.ascontiguousarray)")
    if not a.flags.aligned:
        raise ValueError(f"{name}: not aligned for {dtype}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: read-only, the call writes into it")
    return a


def ndim(name, a, expected):
    """The shape of a when it is an ndarray of one of the expected ranks (a tuple of ints)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.ndim not in expected:
        ranks = " or ".join(str(r) for r in expected)
        raise ValueError(f"{name}: has {a.ndim} dimensions, expected {ranks}")
    return a.shape


def integer(name, value, low=0, high=UINT32_LIMIT):
    """value as an int in [low, high); bools and floats are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer, got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {type(value).__name__}") from None
    if not low <= v < high:
        raise ValueError(f"{name}: {v} is outside {low}..{high - 1}")
    return v


def text(name, value):
    """value as UTF-8 bytes without NUL (C reads it as a string)."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a str, got {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{name}: contains a NUL character")
    return value.encode("utf-8")
