"""Codecs and token policies on their own, outside any sequence (kvp_codec_*, kvp_policy_*)."""

import ctypes

import numpy as np

from . import _checks as checks
from . import _library as lib
from .cache import Shape, _Handle
from .errors import check

UINT8 = np.dtype(np.uint8)


class Codec(_Handle):
    """A codec over vectors of dim floats, e.g. Codec("turboquant(bits=3)", 128) (kvp_codec_open).

    A codec that fits parameters (kivi) does so on its first encode; its calls are serialized.
    """

    _what = "codec"

    def __init__(self, spec, dim):
        self.dim = checks.integer("dim", dim, 1)
        raw = ctypes.c_void_p()
        check(lib.native().kvp_codec_open(checks.text("spec", spec), self.dim, ctypes.byref(raw)),
              "kvp_codec_open")
        lib.give_lock(self)
        self._handle = raw.value
        self.group = lib.native().kvp_codec_group(self._handle)

    def _live_handle(self):
        return self._handle

    def nbytes(self, n):
        """Bytes that n tokens take encoded (n rounded up to whole groups)."""
        n = checks.integer("n", n)
        with self._lock:
            return lib.native().kvp_codec_bytes(self._live(), n)

    def _count(self, name, n):
        n = checks.integer(name, n)
        if n % self.group:
            raise ValueError(f"{name}: {n} tokens is not a multiple of the codec's group of {self.group}")
        return n

    def _codes(self, codes, n):
        """codes checked as uint8 [nbytes(n)]; n inferred from their length when None."""
        checks.ndim("codes", codes, (1,))
        if n is None:
            per_group = self.nbytes(self.group)
            n = codes.shape[0] // per_group * self.group
        n = self._count("n", n)
        return checks.array("codes", codes, UINT8, (self.nbytes(n),)), n

    def encode(self, x):
        """x: float32 [n][dim], n a multiple of group. Returns the codes, uint8 [nbytes(n)]."""
        shape = checks.ndim("x", x, (2,))
        n = self._count("x.shape[0]", shape[0])
        x = checks.array("x", x, checks.FLOAT32, (n, self.dim))
        codes = np.empty(self.nbytes(n), dtype=np.uint8)
        with self._lock:
            check(lib.native().kvp_codec_encode(self._live(), n, x.ctypes.data, codes.ctypes.data),
                  "kvp_codec_encode")
        return codes

    def decode(self, codes, n=None):
        """The float32 [n][dim] that codes stand for; n is inferred from len(codes) when None."""
        codes, n = self._codes(codes, n)
        x = np.empty((n, self.dim), dtype=np.float32)
        with self._lock:
            check(lib.native().kvp_codec_decode(self._live(), n, codes.ctypes.data, x.ctypes.data),
                  "kvp_codec_decode")
        return x

    def dot(self, codes, q, n=None):
        """q . x for each of the n encoded vectors, on the codes: float32 [n]. q: float32 [dim]."""
        codes, n = self._codes(codes, n)
        q = checks.array("q", q, checks.FLOAT32, (self.dim,))
        out = np.empty(n, dtype=np.float32)
        with self._lock:
            check(lib.native().kvp_codec_dot(self._live(), n, codes.ctypes.data, q.ctypes.data,
                                             out.ctypes.data), "kvp_codec_dot")
        return out

    def close(self):
        with self._lock:
            h, self._handle = self._handle, None
            if h is not None:
                lib.native().kvp_codec_close(h)

    def __repr__(self):
        return f"<kvpager.Codec dim={self.dim} {'closed' if self.closed else 'open'}>"


class Policy(_Handle):
    """A token policy for one sequence's history, e.g. Policy("h2o(heavy=0.1,recent=0.1)", shape)
    (kvp_policy_open). Its calls are serialized."""

    _what = "policy"

    def __init__(self, spec, shape):
        if not isinstance(shape, Shape):
            raise ValueError(f"shape: expected a kvpager.Shape, got {type(shape).__name__}")
        self.shape = shape
        native_shape = shape.native()
        raw = ctypes.c_void_p()
        check(lib.native().kvp_policy_open(checks.text("spec", spec), ctypes.byref(native_shape),
                                           ctypes.byref(raw)), "kvp_policy_open")
        lib.give_lock(self)
        self._handle = raw.value

    def _live_handle(self):
        return self._handle

    def _stream(self, layer, kv_head):
        return (checks.integer("layer", layer, 0, self.shape.n_layers),
                checks.integer("kv_head", kv_head, 0, self.shape.n_kv_heads))

    @staticmethod
    def _positions(pos):
        checks.ndim("pos", pos, (1,))
        return checks.array("pos", pos, checks.INT32, pos.shape)

    def score(self, layer, kv_head, t0, pos, k):
        """Scores of stream (layer, kv_head)'s tokens, higher = keep: float32 [n] (kvp_policy_score).

        pos: int32 [n] increasing absolute positions; k: float32 [n][head_dim] after RoPE; t0: the
        position of the next token, after pos[-1].
        """
        layer, kv_head = self._stream(layer, kv_head)
        t0 = checks.integer("t0", t0, -(1 << 63), 1 << 63)
        pos = self._positions(pos)
        n = pos.shape[0]
        k = checks.array("k", k, checks.FLOAT32, (n, self.shape.head_dim))
        scores = np.empty(n, dtype=np.float32)
        with self._lock:
            check(lib.native().kvp_policy_score(self._live(), layer, kv_head, t0, n, pos.ctypes.data,
                                                k.ctypes.data, scores.ctypes.data), "kvp_policy_score")
        return scores

    def observe(self, layer, kv_head, t, q=None, pos=None, weights=None):
        """What a query token at position t saw on stream (layer, kv_head), for hosts that run their
        own attention (kvp_policy_observe).

        q: float32 [group][head_dim] after RoPE, or None; pos: int32 [n] increasing; weights: float32
        [group][n] softmax weights over those tokens, or None (needs pos).
        """
        layer, kv_head = self._stream(layer, kv_head)
        t = checks.integer("t", t, 0, 1 << 63)
        group = self.shape.n_heads // self.shape.n_kv_heads
        if q is not None:
            q = checks.array("q", q, checks.FLOAT32, (group, self.shape.head_dim))
        n = 0
        if pos is not None:
            pos = self._positions(pos)
            n = pos.shape[0]
        if weights is not None:
            if pos is None:
                raise ValueError("weights: given without pos, the positions they weigh")
            weights = checks.array("weights", weights, checks.FLOAT32, (group, n))
        address = lambda a: None if a is None else a.ctypes.data  # noqa: E731
        with self._lock:
            check(lib.native().kvp_policy_observe(self._live(), layer, kv_head, t, address(q), n,
                                                  address(pos), address(weights)),
                  "kvp_policy_observe")

    def close(self):
        with self._lock:
            h, self._handle = self._handle, None
            if h is not None:
                lib.native().kvp_policy_close(h)

    def __repr__(self):
        return f"<kvpager.Policy {'closed' if self.closed else 'open'}>"
