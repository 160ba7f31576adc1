"""Finding libkvpager.so.1 and declaring its calls for ctypes.

The library is looked up, in order, at $KVPAGER_LIB, next to the package (in its directory, then in the
directory that holds it), and last by the dynamic linker's own search (the system's copy). It is loaded
on first use, so `import kvpager` works before a library is in place.

ctypes.CDLL releases the GIL around every call, so threads on different sequences run the C code in
parallel.
"""

import ctypes
import os
import threading
import weakref

SONAME = "libkvpager.so.1"

# kvp_status values (include/kvpager.h)
OK = 0
EINVAL = -1
ENOMEM = -2
EIO = -3
ECORRUPT = -4
EPERM = -5
EUNSUPPORTED = -6
EABI = -7
EBUSY = -8

# the header this binding follows
ABI_MAJOR = 1
ABI_MINOR = 4

_handle = ctypes.c_void_p
_u32 = ctypes.c_uint32
_ptr = ctypes.c_void_p


class Shape(ctypes.Structure):
    """kvp_shape"""
    _fields_ = [("n_layers", ctypes.c_uint32), ("n_heads", ctypes.c_uint32),
                ("n_kv_heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("rope_theta", ctypes.c_float), ("rope_layout", ctypes.c_int)]


class Stats(ctypes.Structure):
    """kvp_stats: the caller sets size first, so an older struct is filled only up to its size."""
    _fields_ = [("size", ctypes.c_uint32), ("tokens_appended", ctypes.c_uint64),
                ("tokens_retained", ctypes.c_uint64), ("bytes_exact", ctypes.c_uint64),
                ("bytes_compressed", ctypes.c_uint64), ("bytes_meta", ctypes.c_uint64),
                ("bytes_spilled", ctypes.c_uint64), ("bytes_dense_fp16", ctypes.c_uint64),
                ("bytes_cached", ctypes.c_uint64), ("prefix_hit_tokens", ctypes.c_uint64),
                ("prefix_miss_tokens", ctypes.c_uint64), ("remote_hit_tokens", ctypes.c_uint64),
                ("remote_faults", ctypes.c_uint64), ("remote_rejected", ctypes.c_uint64)]


class RemoteStats(ctypes.Structure):
    """kvp_remote_stats: sized as Stats is."""
    _fields_ = [("size", ctypes.c_uint32), ("queued", ctypes.c_uint64), ("published", ctypes.c_uint64),
                ("dropped", ctypes.c_uint64), ("bytes_published", ctypes.c_uint64), ("faults", ctypes.c_uint64)]


class HeadLevel(ctypes.Structure):
    """kvp_head_level"""
    _fields_ = [("size", ctypes.c_uint32), ("coherence", ctypes.c_float),
                ("aggressiveness", ctypes.c_float), ("overridden", ctypes.c_int32),
                ("budget", ctypes.c_uint32), ("level", ctypes.c_uint32), ("bits", ctypes.c_uint32)]


_status = ctypes.c_int
_POINTER = ctypes.POINTER

# name: (restype, argtypes). Pointers to arrays travel as c_void_p (the address of a checked array).
_CALLS = {
    "kvp_strerror": (ctypes.c_char_p, [_status]),
    "kvp_last_error": (ctypes.c_char_p, []),
    "kvp_pool_open": (_status, [ctypes.c_char_p, _POINTER(_handle)]),
    "kvp_pool_close": (None, [_handle]),
    "kvp_pool_remote_stats": (_status, [_handle, _POINTER(RemoteStats)]),
    "kvp_pool_flush": (_status, [_handle, _u32]),
    "kvp_tenant_open": (_status, [_handle, ctypes.c_char_p, ctypes.c_char_p, _POINTER(_handle)]),
    "kvp_tenant_close": (None, [_handle]),
    "kvp_seq_open": (_status, [_handle, _POINTER(Shape), _POINTER(_handle)]),
    "kvp_seq_open_prefix": (_status, [_handle, _POINTER(Shape), _u32, _ptr, _POINTER(_handle), _POINTER(_u32)]),
    "kvp_seq_fork": (_status, [_handle, _POINTER(_handle)]),
    "kvp_seq_close": (None, [_handle]),
    "kvp_append": (_status, [_handle, _u32, _u32, _ptr, _ptr, _ptr]),
    "kvp_attend": (_status, [_handle, _u32, _ptr, _ptr]),
    "kvp_seq_step": (_status, [_handle]),
    "kvp_gather": (_status, [_handle, _u32, _u32, _u32, _ptr, _ptr, _ptr, _POINTER(_u32)]),
    "kvp_seq_park": (_status, [_handle]),
    "kvp_seq_unpark": (_status, [_handle]),
    "kvp_seq_stats": (_status, [_handle, _POINTER(Stats)]),
    "kvp_tenant_stats": (_status, [_handle, _POINTER(Stats)]),
    "kvp_seq_head_level": (_status, [_handle, _u32, _u32, _POINTER(HeadLevel)]),
    "kvp_seq_set_head_level": (_status, [_handle, _u32, _u32, ctypes.c_float]),
    "kvp_codec_open": (_status, [ctypes.c_char_p, _u32, _POINTER(_handle)]),
    "kvp_codec_group": (_u32, [_handle]),
    "kvp_codec_bytes": (ctypes.c_size_t, [_handle, _u32]),
    "kvp_codec_encode": (_status, [_handle, _u32, _ptr, _ptr]),
    "kvp_codec_decode": (_status, [_handle, _u32, _ptr, _ptr]),
    "kvp_codec_dot": (_status, [_handle, _u32, _ptr, _ptr, _ptr]),
    "kvp_codec_close": (None, [_handle]),
    "kvp_policy_open": (_status, [ctypes.c_char_p, _POINTER(Shape), _POINTER(_handle)]),
    "kvp_policy_score": (_status, [_handle, _u32, _u32, ctypes.c_int64, _u32, _ptr, _ptr, _ptr]),
    "kvp_policy_observe": (_status, [_handle, _u32, _u32, ctypes.c_int64, _ptr, _u32, _ptr, _ptr]),
    "kvp_policy_close": (None, [_handle]),
}

_lock = threading.Lock()
_native = None
_path = None
_guarded = weakref.WeakSet()  # every object whose lock give_lock made


def give_lock(obj):
    """Sets obj._lock, a lock its calls take, which a fork()'s child replaces (see _after_fork_in_child)."""
    obj._lock = threading.RLock()
    _guarded.add(obj)


def _after_fork_in_child():
    """os.fork()'s child: a lock that one of the parent's threads held stays held there for good, so every
    object gets a new one. Its calls then reach the library, which refuses the parent's pools, tenants and
    sequences with PermissionDenied; a close only retires the handle."""
    global _lock
    _lock = threading.Lock()
    for obj in list(_guarded):
        obj._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def candidates():
    """The paths tried, in order; the last one is a bare SONAME for the dynamic linker."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = []
    env = os.environ.get("KVPAGER_LIB")
    if env:
        paths.append(env)
    paths.append(os.path.join(here, SONAME))
    paths.append(os.path.join(os.path.dirname(here), SONAME))
    paths.append(SONAME)
    return paths


def _open():
    env = os.environ.get("KVPAGER_LIB")
    if env:
        # $KVPAGER_LIB names one library on purpose: never fall back to another copy
        try:
            return ctypes.CDLL(env), env
        except OSError as e:
            raise OSError(f"kvpager: KVPAGER_LIB={env} does not load: {e}") from e
    tried = []
    for path in candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append(f"{path}: no such file")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append(str(e))
    raise OSError("kvpager: cannot find " + SONAME + " (set KVPAGER_LIB to its path); tried: " +
                  "; ".join(tried))


def _declare(lib, path):
    for name, (restype, argtypes) in _CALLS.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise OSError(f"kvpager: {path} has no {name}: a library older than include/kvpager.h "
                          f"ABI {ABI_MAJOR}.{ABI_MINOR}") from None
        fn.restype = restype
        fn.argtypes = argtypes


def native():
    """The loaded library with every call declared; loads it on the first call."""
    global _native, _path
    if _native is None:
        with _lock:
            if _native is None:
                lib, path = _open()
                _declare(lib, path)
                _path = path
                _native = lib
    return _native


def path():
    """Where the loaded library came from (loads it if needed)."""
    native()
    return _path
