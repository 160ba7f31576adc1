"""Errors: wrong arrays raise ValueError naming the argument before any C call; a failing status raises
the kvpager.Error subclass of that status carrying kvp_last_error()."""

import numpy as np
import pytest

import kvpager
from kvpager import _library
from conftest import SHAPE, fill


def last_error():
    return _library.native().kvp_last_error().decode()


def leave_a_known_error():
    """Makes the library fail once, so a later C call would overwrite this message."""
    with pytest.raises(kvpager.InvalidArgument):
        kvpager.Pool("marker=1")
    return last_error()


K = np.zeros((2, 32), np.float32)

WRONG_APPENDS = {
    "k": [
        ("dtype", lambda: (0, 0, K.astype(np.float64), K)),
        ("shape", lambda: (0, 0, np.zeros((2, 16), np.float32), K)),
        ("C-contiguous", lambda: (0, 0, np.zeros((32, 2), np.float32).T, K)),
        ("numpy array", lambda: (0, 0, K.tolist(), K)),
    ],
    "v": [("shape", lambda: (0, 0, K, np.zeros((3, 32), np.float32)))],
    "pos": [
        ("dtype", lambda: (0, np.array([0], np.int64), K[None], K[None])),
        ("dimensions", lambda: (0, np.zeros((1, 1), np.int32), K[None], K[None])),
        ("integer", lambda: (0, 1.5, K, K)),
    ],
    "layer": [("outside", lambda: (2, 0, K, K)), ("outside", lambda: (-1, 0, K, K))],
}


@pytest.mark.parametrize("name,what,args", [(n, w, a) for n, cases in WRONG_APPENDS.items() for w, a in cases])
def test_a_wrong_append_argument_raises_valueerror_naming_it_before_c(seq, name, what, args):
    fill(seq, 0, 3, seed=1)
    marker = leave_a_known_error()
    with pytest.raises(ValueError, match=f"^{name}: .*{what}"):
        seq.append(*args())
    assert last_error() == marker
    assert seq.stats().tokens_appended == 3 * 2 * 2


def test_a_wrong_query_or_output_raises_valueerror_naming_it(seq):
    q = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="^q: shape is \\(4, 16\\), expected \\(4, 32\\)"):
        seq.attend(0, np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match="^q: dtype is float16"):
        seq.attend(0, q.astype(np.float16))
    with pytest.raises(ValueError, match="^q: .*byteswapped|^q: dtype is >f4"):
        seq.attend(0, q.astype(">f4"))
    out = np.zeros((4, 32), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="^out: read-only"):
        seq.attend(0, q, out)
    with pytest.raises(ValueError, match="^out: not C-contiguous"):
        seq.attend(0, q, np.zeros((4, 64), np.float32)[:, ::2])


def test_values_that_are_not_finite_raise_invalidargument_naming_them(seq):
    fill(seq, 0, 3, seed=4)
    k = np.ones((2, 32), np.float32)
    v = k.copy()
    v[1, 9] = np.nan
    with pytest.raises(kvpager.InvalidArgument, match="v of token 0 \\(position 3\\), KV head 1, channel 9 is nan"):
        seq.append(0, 3, k, v)
    assert seq.stats().tokens_appended == 3 * 2 * 2
    q = np.ones((4, 32), np.float32)
    q[2, 0] = np.inf
    with pytest.raises(kvpager.InvalidArgument, match="q of head 2, channel 0 is inf"):
        seq.attend(0, q)


def test_attend_writes_into_the_given_output(seq):
    fill(seq, 0, 5, seed=2)
    out = np.full((4, 32), np.nan, np.float32)
    q = np.ones((4, 32), np.float32)
    assert seq.attend(1, q, out) is out
    np.testing.assert_array_equal(out, seq.attend(1, q))


def test_a_bad_spec_raises_invalidargument_with_the_librarys_message():
    with pytest.raises(kvpager.InvalidArgument) as e:
        kvpager.Pool("mem=12parsecs")
    assert e.value.status == -1
    assert e.value.detail == last_error()
    assert "12parsecs" in e.value.detail
    assert isinstance(e.value, kvpager.Error)


def test_a_duplicate_tenant_name_is_invalid(pool):
    first = pool.tenant("a")  # kept: a dropped tenant is closed and its name freed
    with pytest.raises(kvpager.InvalidArgument, match="'a' already exists"):
        pool.tenant("a")
    assert not first.closed


def test_a_shape_the_library_refuses_is_invalid(tenant):
    with pytest.raises(kvpager.InvalidArgument, match="not a multiple"):
        tenant.sequence(kvpager.Shape(2, 3, 2, 32))
    with pytest.raises(ValueError, match="^shape.n_layers"):
        tenant.sequence(kvpager.Shape(-1, 4, 2, 32))
    with pytest.raises(ValueError, match="^shape: expected a kvpager.Shape"):
        tenant.sequence((2, 4, 2, 32))


def test_over_quota_raises_outofmemory_and_appends_nothing(pool):
    tenant = pool.tenant("small", "quota=16KiB,block=16")
    seq = tenant.sequence(SHAPE)
    with pytest.raises(kvpager.OutOfMemory, match="quota") as e:
        for i in range(1000):
            fill(seq, i * 16, 16, seed=i)
    assert e.value.status == -2
    stats = seq.stats()
    assert stats.tokens_appended % (16 * 2) == 0  # no layer half-appended
    assert stats.tokens_appended < 1000 * 16 * 2 * 2


def test_park_without_a_spill_device_is_unsupported(seq):
    with pytest.raises(kvpager.Unsupported, match="no spill device"):
        seq.park()


def test_head_levels_without_a_gate_are_invalid(seq):
    with pytest.raises(kvpager.InvalidArgument, match="gate=off"):
        seq.set_head_level(0, 0, 0.5)
    with pytest.raises(ValueError, match="^kv_head"):
        seq.head_level(0, 2)


def test_errors_are_per_thread(pool):
    import threading
    seen = {}

    def fail_here():
        with pytest.raises(kvpager.InvalidArgument):
            pool.tenant("x", "window=-3")
        seen["thread"] = last_error()

    marker = leave_a_known_error()
    t = threading.Thread(target=fail_here)
    t.start()
    t.join()
    assert "window" in seen["thread"]
    assert last_error() == marker


def test_every_status_has_its_own_exception_and_description():
    statuses = [_library.EINVAL, _library.ENOMEM, _library.EIO, _library.ECORRUPT, _library.EPERM,
                _library.EUNSUPPORTED, _library.EABI, _library.EBUSY]
    classes = set()
    for status in statuses:
        with pytest.raises(kvpager.Error) as caught:
            kvpager.errors.check(status, "test")
        assert caught.value.status == status
        assert type(caught.value) is not kvpager.Error
        classes.add(type(caught.value))
        assert kvpager.errors.strerror(status) != "unknown status"
    assert len(classes) == len(statuses)
    assert kvpager.errors.strerror(_library.EBUSY) == "another call on the sequence is in progress"
    assert issubclass(kvpager.Busy, kvpager.Error)
