"""Pools, tenants and sequences: the cache itself.

Lifetimes follow the C library: closing a pool closes its tenants and their sequences, closing a tenant
closes its sequences. The Python objects know it: a child of a closed parent raises
kvpager.PermissionDenied before any call, so a freed C pointer is never passed on. Each object is a
context manager, closes when it is garbage-collected, and holds a lock that its calls take; a parent's
close takes its children's locks first, so it waits for calls in flight on other threads. Locks are
taken pool, then tenant, then sequence, never the other way.

The collector runs finalizers on whatever thread it interrupts, which may hold a child's lock while
another thread holding the parent waits for it. So a finalizer never waits for its parent's lock: when
the parent is busy, it hands the handle to the parent, whose next call (or close) closes it in C.
"""

import ctypes
import enum
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _checks as checks
from . import _library as lib
from .errors import check, closed


class RopeLayout(enum.IntEnum):
    """kvp_rope_layout: which channels RoPE rotates together."""
    HALF = 0         # (i, i + head_dim / 2)
    INTERLEAVED = 1  # (2m, 2m + 1), as llama2.c


@dataclass(frozen=True)
class Shape:
    """The attention geometry of one model (kvp_shape). n_heads is a multiple of n_kv_heads."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = RopeLayout.HALF

    def native(self):
        """The kvp_shape for C; ValueError for a field C cannot hold."""
        fields = {name: checks.integer(f"shape.{name}", getattr(self, name))
                  for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim")}
        try:
            theta = float(self.rope_theta)
            layout = RopeLayout(self.rope_layout)
        except (TypeError, ValueError) as e:
            raise ValueError(f"shape: {e}") from None
        return lib.Shape(rope_theta=theta, rope_layout=int(layout), **fields)


@dataclass(frozen=True)
class Stats:
    """Byte and token counters (kvp_stats); bytes as allocated."""
    tokens_appended: int
    tokens_retained: int
    bytes_exact: int
    bytes_compressed: int
    bytes_meta: int
    bytes_spilled: int
    bytes_dense_fp16: int
    bytes_cached: int  # blocks the prefix cache holds and no sequence does (0 for a sequence)
    prefix_hit_tokens: int
    prefix_miss_tokens: int
    remote_hit_tokens: int  # of the hits, what the remote tier (pool remote=) supplied
    remote_faults: int
    remote_rejected: int

    @classmethod
    def read(cls, call, handle, name):
        raw = lib.Stats(size=ctypes.sizeof(lib.Stats))
        check(call(handle, ctypes.byref(raw)), name)
        return cls(**{f: getattr(raw, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RemoteStats:
    """The remote tier's publication, pool-wide (kvp_remote_stats); all 0 without remote=."""
    queued: int  # values waiting for the writer or on their way now
    published: int  # values the servers stored
    dropped: int  # values not stored: the queue full, refused, a failed write
    bytes_published: int
    faults: int  # the remote tier's faults, lookups' and the writer's


@dataclass(frozen=True)
class HeadLevel:
    """The gating state of one (layer, KV head) (kvp_head_level)."""
    coherence: float
    aggressiveness: float
    overridden: bool
    budget: int
    level: int
    bits: int


class Gathered(NamedTuple):
    """The retained tokens of one stream in position order: pos [n] int32, k and v [n][head_dim]."""
    pos: np.ndarray
    k: np.ndarray
    v: np.ndarray


class _Handle:
    """A C handle with a lock, closed by close(), by `with`, or when collected."""

    _what = "object"
    _handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._handle is not None:
                self._collect()
        except Exception:
            pass  # interpreter shutdown: the library or the module may be gone already

    def _collect(self):
        """close() for the collector: never waits for a parent's lock (see the module's comment)."""
        self.close()

    @property
    def closed(self):
        """True once closed, by this object's close() or by a parent's."""
        return self._live_handle() is None

    def _live_handle(self):
        raise NotImplementedError

    def _live(self):
        h = self._live_handle()
        if h is None:
            raise closed(self._what)
        return h

    def _forget(self):
        """The parent's close frees this object in C: wait for a call in flight, then drop the handle."""
        with self._lock:
            for child in list(getattr(self, "_children", ())):
                child._forget()
            self._handle = None


class Pool(_Handle):
    """All cache memory of one process: kvp_pool_open(spec)."""

    _what = "pool"

    def __init__(self, spec=""):
        raw = ctypes.c_void_p()
        check(lib.native().kvp_pool_open(checks.text("spec", spec), ctypes.byref(raw)), "kvp_pool_open")
        lib.give_lock(self)
        self._children = weakref.WeakSet()
        self._orphans = []  # tenant handles their collector could not close while the pool was busy
        self._handle = raw.value

    def _live_handle(self):
        return self._handle

    def _drain(self):
        """Closes what the collector handed over; the caller holds the pool's lock."""
        while self._orphans:
            lib.native().kvp_tenant_close(self._orphans.pop())

    def tenant(self, name, spec=""):
        """A new tenant: a quota and a default cache configuration (kvp_tenant_open)."""
        name_c, spec_c = checks.text("name", name), checks.text("spec", spec)
        with self._lock:
            self._drain()
            raw = ctypes.c_void_p()
            check(lib.native().kvp_tenant_open(self._live(), name_c, spec_c, ctypes.byref(raw)),
                  "kvp_tenant_open")
            t = Tenant(self, name, raw.value)
            self._children.add(t)
            return t

    def remote_stats(self):
        """What became of the prompts published to the remote tier (kvp_pool_remote_stats)."""
        with self._lock:
            raw = lib.RemoteStats(size=ctypes.sizeof(lib.RemoteStats))
            check(lib.native().kvp_pool_remote_stats(self._live(), ctypes.byref(raw)), "kvp_pool_remote_stats")
            return RemoteStats(**{f: getattr(raw, f) for f in RemoteStats.__dataclass_fields__})

    def flush(self, wait_ms=10000):
        """Waits until every value queued for the remote tier is stored or dropped; raises Busy when
        values are still queued after wait_ms (kvp_pool_flush). Call it before closing a pool whose
        prompts other processes should find: close gives the queue only remote_timeout."""
        wait = checks.integer("wait_ms", wait_ms)
        with self._lock:  # a close on another thread waits for the flush
            check(lib.native().kvp_pool_flush(self._live(), wait), "kvp_pool_flush")

    def close(self):
        """Closes the pool with its tenants and sequences; a second close does nothing."""
        with self._lock:
            h = self._handle
            if h is None:
                return
            for t in list(self._children):
                t._forget()
            self._orphans.clear()  # the pool's close closes them
            self._handle = None
            lib.native().kvp_pool_close(h)

    def __repr__(self):
        return f"<kvpager.Pool {'closed' if self.closed else 'open'}>"


def _prompt_tokens(prompt):
    """A prompt's token ids as a C-contiguous int32 array [n], each checked to fit int32."""
    a = np.asarray(prompt)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"prompt: expected a non-empty sequence of token ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"prompt: expected integer token ids, got {a.dtype}")
    if a.min() < -(1 << 31) or a.max() >= 1 << 31:
        raise ValueError("prompt: a token id does not fit int32")
    return np.ascontiguousarray(a, dtype=np.int32)


class Tenant(_Handle):
    """A quota, a default cache configuration and a jemalloc arena, made by Pool.tenant()."""

    _what = "tenant"

    def __init__(self, pool, name, handle):
        self.pool = pool
        self.name = name
        lib.give_lock(self)
        self._children = weakref.WeakSet()
        self._orphans = []  # sequence handles their collector could not close while the tenant was busy
        self._handle = handle

    def _drain(self):
        """Closes what the collector handed over; the caller holds the tenant's lock."""
        while self._orphans:
            lib.native().kvp_seq_close(self._orphans.pop())

    def _live_handle(self):
        return self._handle if self.pool._handle is not None else None

    def sequence(self, shape, prompt=None):
        """A new sequence of this shape (kvp_seq_open).

        With prompt (token ids, token i at position i): kvp_seq_open_prefix. The sequence's n_cached
        first tokens are in it already from the tenant's prefix cache (model=, prefix=on); append from
        position n_cached on. Without it n_cached is 0.
        """
        if not isinstance(shape, Shape):
            raise ValueError(f"shape: expected a kvpager.Shape, got {type(shape).__name__}")
        native_shape = shape.native()
        tokens = None if prompt is None else _prompt_tokens(prompt)
        with self._lock:
            self._live()
            self._drain()
            raw = ctypes.c_void_p()
            if tokens is None:
                check(lib.native().kvp_seq_open(self._live(), ctypes.byref(native_shape), ctypes.byref(raw)),
                      "kvp_seq_open")
                return self._adopt(shape, raw.value)
            cached = ctypes.c_uint32()
            check(lib.native().kvp_seq_open_prefix(self._live(), ctypes.byref(native_shape), tokens.shape[0],
                                                    tokens.ctypes.data, ctypes.byref(raw), ctypes.byref(cached)),
                  "kvp_seq_open_prefix")
            s = self._adopt(shape, raw.value)
            s.n_cached = cached.value
            return s

    def _adopt(self, shape, handle):
        s = Sequence(self, shape, handle)
        self._children.add(s)
        return s

    def stats(self):
        """Counters over the tenant's sequences; blocks shared by forks count once (kvp_tenant_stats)."""
        with self._lock:
            h = self._live()
            self._drain()
            return Stats.read(lib.native().kvp_tenant_stats, h, "kvp_tenant_stats")

    def close(self):
        """Closes the tenant and its sequences; a second close does nothing."""
        with self.pool._lock, self._lock:
            h = self._live_handle()
            for s in list(self._children):
                s._forget()
            self._orphans.clear()  # the tenant's close closes them
            self._handle = None
            self.pool._children.discard(self)
            if h is not None:
                lib.native().kvp_tenant_close(h)

    def _collect(self):
        _collect_child(self, self.pool)

    def __repr__(self):
        return f"<kvpager.Tenant {self.name!r} {'closed' if self.closed else 'open'}>"


class Sequence(_Handle):
    """One request's cache, made by Tenant.sequence() or Sequence.fork().

    Calls on one sequence are serialized by its lock; calls on different sequences run in parallel
    (ctypes releases the GIL).
    """

    _what = "sequence"

    def __init__(self, tenant, shape, handle):
        self.tenant = tenant
        self.shape = shape
        lib.give_lock(self)
        self._handle = handle
        self._kv = (shape.n_kv_heads, shape.head_dim)
        self._q = (shape.n_heads, shape.head_dim)
        self.n_cached = 0  # tokens found in the prefix cache when Tenant.sequence(prompt=) opened it

    def _live_handle(self):
        if self.tenant._live_handle() is None:
            return None
        return self._handle

    def _layer(self, layer):
        return checks.integer("layer", layer, 0, self.shape.n_layers)

    def _kv_head(self, kv_head):
        return checks.integer("kv_head", kv_head, 0, self.shape.n_kv_heads)

    def _positions(self, pos, k):
        """pos as an int32 array [n] and the k/v shape it implies."""
        if isinstance(pos, np.ndarray):
            checks.ndim("pos", pos, (1,))
            pos = checks.array("pos", pos, checks.INT32, pos.shape)
            return pos, (pos.shape[0],) + self._kv
        p = checks.integer("pos", pos, -(1 << 31), 1 << 31)
        one = np.array([p], dtype=np.int32)
        # one token given by its position alone may come as [n_kv_heads][head_dim]
        if isinstance(k, np.ndarray) and k.ndim == 2:
            return one, self._kv
        return one, (1,) + self._kv

    def append(self, layer, pos, k, v):
        """Appends n tokens to every KV head of a layer, all or nothing (kvp_append).

        pos: int32 array [n] of absolute positions, or one int; k, v: float32 [n][n_kv_heads][head_dim]
        (or [n_kv_heads][head_dim] with an int pos), keys after RoPE.
        """
        layer = self._layer(layer)
        pos, kv_shape = self._positions(pos, k)
        k = checks.array("k", k, checks.FLOAT32, kv_shape)
        v = checks.array("v", v, checks.FLOAT32, kv_shape)
        with self._lock:
            check(lib.native().kvp_append(self._live(), layer, pos.shape[0], pos.ctypes.data,
                                          k.ctypes.data, v.ctypes.data), "kvp_append")

    def attend(self, layer, q, out=None):
        """softmax(q K^T / sqrt(head_dim)) V of one query token over a layer (kvp_attend).

        q: float32 [n_heads][head_dim] after RoPE; out: the same shape, written and returned
        (a new array when None).
        """
        layer = self._layer(layer)
        q = checks.array("q", q, checks.FLOAT32, self._q)
        if out is None:
            out = np.empty(self._q, dtype=np.float32)
        else:
            out = checks.array("out", out, checks.FLOAT32, self._q, writable=True)
        with self._lock:
            check(lib.native().kvp_attend(self._live(), layer, q.ctypes.data, out.ctypes.data),
                  "kvp_attend")
        return out

    def step(self):
        """Ends one decode step: policy rounds run here (kvp_seq_step)."""
        with self._lock:
            check(lib.native().kvp_seq_step(self._live()), "kvp_seq_step")

    def gather(self, layer, kv_head):
        """The retained tokens of stream (layer, kv_head), decoded to fp32 (kvp_gather)."""
        layer, kv_head = self._layer(layer), self._kv_head(kv_head)
        call = lib.native().kvp_gather
        with self._lock:
            h = self._live()
            n = ctypes.c_uint32(0xFFFFFFFF)
            status = call(h, layer, kv_head, 0, None, None, None, ctypes.byref(n))
            if status != lib.OK and n.value == 0xFFFFFFFF:
                check(status, "kvp_gather")  # failed before counting: not a size question
            count = 0 if status == lib.OK else n.value
            pos = np.empty(count, dtype=np.int32)
            k = np.empty((count, self.shape.head_dim), dtype=np.float32)
            v = np.empty((count, self.shape.head_dim), dtype=np.float32)
            if count:
                check(call(h, layer, kv_head, count, pos.ctypes.data, k.ctypes.data, v.ctypes.data,
                           ctypes.byref(n)), "kvp_gather")
        return Gathered(pos, k, v)

    def fork(self):
        """A copy-on-write duplicate in the same tenant (kvp_seq_fork)."""
        with self.tenant._lock, self._lock:
            raw = ctypes.c_void_p()
            check(lib.native().kvp_seq_fork(self._live(), ctypes.byref(raw)), "kvp_seq_fork")
            return self.tenant._adopt(self.shape, raw.value)

    def park(self):
        """Writes every block to the pool's spill device and frees the memory (kvp_seq_park)."""
        with self._lock:
            check(lib.native().kvp_seq_park(self._live()), "kvp_seq_park")

    def unpark(self):
        """Reads the parked blocks back and checks them (kvp_seq_unpark)."""
        with self._lock:
            check(lib.native().kvp_seq_unpark(self._live()), "kvp_seq_unpark")

    def stats(self):
        """Counters of this sequence; blocks shared with forks count here too (kvp_seq_stats)."""
        with self._lock:
            return Stats.read(lib.native().kvp_seq_stats, self._live(), "kvp_seq_stats")

    def head_level(self, layer, kv_head):
        """Coherence, aggressiveness, budget and ladder level of one head (kvp_seq_head_level)."""
        layer, kv_head = self._layer(layer), self._kv_head(kv_head)
        raw = lib.HeadLevel(size=ctypes.sizeof(lib.HeadLevel))
        with self._lock:
            check(lib.native().kvp_seq_head_level(self._live(), layer, kv_head, ctypes.byref(raw)),
                  "kvp_seq_head_level")
        return HeadLevel(raw.coherence, raw.aggressiveness, bool(raw.overridden), raw.budget, raw.level,
                         raw.bits)

    def set_head_level(self, layer, kv_head, aggressiveness):
        """Pins a head's aggressiveness in [0, 1] from the next step on; None hands it back to the
        measured coherence (kvp_seq_set_head_level)."""
        layer, kv_head = self._layer(layer), self._kv_head(kv_head)
        if aggressiveness is None:
            a = -1.0
        else:
            try:
                a = float(aggressiveness)
            except (TypeError, ValueError):
                raise ValueError(f"aggressiveness: expected a number in [0, 1] or None, "
                                 f"got {aggressiveness!r}") from None
        with self._lock:
            check(lib.native().kvp_seq_set_head_level(self._live(), layer, kv_head, a),
                  "kvp_seq_set_head_level")

    def close(self):
        """Closes the sequence; its forks keep the blocks they share. A second close does nothing."""
        with self.tenant._lock, self._lock:
            h = self._live_handle()
            self._handle = None
            self.tenant._children.discard(self)
            if h is not None:
                lib.native().kvp_seq_close(h)

    def _collect(self):
        _collect_child(self, self.tenant)

    def __repr__(self):
        return f"<kvpager.Sequence {'closed' if self.closed else 'open'}>"


def _collect_child(child, parent):
    """A collected tenant or sequence: closed now when its parent is free, else handed to the parent."""
    if parent._lock.acquire(blocking=False):
        try:
            child.close()
        finally:
            parent._lock.release()
        return
    # the parent's holder may be closing it; then its close frees this handle in C along with the rest
    h, child._handle = child._handle, None
    if h is not None and parent._handle is not None:
        parent._orphans.append(h)
