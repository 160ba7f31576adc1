"""Fixtures of the binding's suites: the library under test, small shapes, pools, models.

The library is $KVPAGER_LIB (`make pytest` sets it to the build's libkvpager.so.1), else the repository's
build/libkvpager.so.1. Models are found in $KVP_MODELS, else ../shared/models beside the repository;
a test whose model is missing skips and says which file it looked for.
"""

import os
import sys

import numpy as np
import pytest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(PYTHON_DIR)
sys.path.insert(0, PYTHON_DIR)

if not os.environ.get("KVPAGER_LIB"):
    os.environ["KVPAGER_LIB"] = os.path.join(REPO, "build", "libkvpager.so.1")

import kvpager  # noqa: E402

# two layers, GQA 2, a head_dim the AVX2 kernels take whole
SHAPE = kvpager.Shape(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32)


def models_dir():
    return os.environ.get("KVP_MODELS") or os.path.join(REPO, "..", "shared", "models")


def model_file(name):
    """The path of a model file, or a skip naming where it was looked for."""
    path = os.path.join(models_dir(), name)
    if not os.path.exists(path):
        pytest.skip(f"model {path} is missing (set KVP_MODELS to the models directory)")
    return path


def tokens(rng, n, shape=SHAPE):
    """k, v: float32 [n][n_kv_heads][head_dim] of random values."""
    size = (n, shape.n_kv_heads, shape.head_dim)
    return (rng.standard_normal(size, dtype=np.float32), rng.standard_normal(size, dtype=np.float32))


def fill(seq, first, n, seed):
    """Appends n random tokens at positions first.. to every layer of seq."""
    rng = np.random.default_rng(seed)
    pos = np.arange(first, first + n, dtype=np.int32)
    for layer in range(seq.shape.n_layers):
        k, v = tokens(rng, n, seq.shape)
        seq.append(layer, pos, k, v)


def query(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal((shape.n_heads, shape.head_dim), dtype=np.float32)


def attend_all(seq, seed=7):
    """Attention of a fixed query on every layer: [n_layers][n_heads][head_dim]."""
    return np.stack([seq.attend(layer, query(seed + layer, seq.shape)) for layer in range(seq.shape.n_layers)])


@pytest.fixture
def pool():
    with kvpager.Pool("mem=256MiB") as p:
        yield p


@pytest.fixture
def tenant(pool):
    return pool.tenant("t", "block=16,window=32")


@pytest.fixture
def seq(tenant):
    with tenant.sequence(SHAPE) as s:
        yield s


@pytest.fixture
def spill_pool(tmp_path):
    """A pool with a spill file in the test's directory; skips where io_uring is not permitted."""
    spec = f"spill={tmp_path / 'spill.bin'},spill_max=16MiB"
    try:
        p = kvpager.Pool(spec)
    except kvpager.Unsupported as e:
        if "io_uring" in str(e):
            pytest.skip(f"no spill device here: {e}")
        raise
    with p:
        yield p
