"""Lifetimes: context managers, close order, closing by a parent, closing by the garbage collector."""

import gc

import numpy as np
import pytest

import kvpager
from conftest import SHAPE, attend_all, fill


def test_with_blocks_close_what_they_opened():
    with kvpager.Pool() as pool:
        with pool.tenant("a") as tenant:
            with tenant.sequence(SHAPE) as seq:
                assert not seq.closed
            assert seq.closed and not tenant.closed
        assert tenant.closed and not pool.closed
    assert pool.closed


def test_a_second_close_does_nothing(pool):
    tenant = pool.tenant("a")
    seq = tenant.sequence(SHAPE)
    for _ in range(2):
        seq.close()
        tenant.close()
    pool.close()
    pool.close()
    assert seq.closed and tenant.closed and pool.closed


def test_closing_the_pool_closes_its_tenants_and_sequences():
    pool = kvpager.Pool()
    tenant = pool.tenant("a")
    seq = tenant.sequence(SHAPE)
    fill(seq, 0, 4, seed=1)
    pool.close()
    assert tenant.closed and seq.closed
    with pytest.raises(kvpager.PermissionDenied, match="the sequence is closed"):
        seq.stats()
    with pytest.raises(kvpager.PermissionDenied, match="the tenant is closed"):
        tenant.sequence(SHAPE)
    with pytest.raises(kvpager.PermissionDenied, match="the pool is closed"):
        pool.tenant("b")
    seq.close()  # after its pool: a no-op, not a call on freed memory
    tenant.close()


def test_closing_a_tenant_closes_its_sequences_and_frees_its_name(pool):
    tenant = pool.tenant("a")
    seq = tenant.sequence(SHAPE)
    tenant.close()
    assert seq.closed and not pool.closed
    with pytest.raises(kvpager.PermissionDenied):
        seq.append(0, 0, np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32))
    again = pool.tenant("a")
    assert again.stats().tokens_retained == 0


def test_a_closed_sequence_refuses_every_call(seq):
    seq.close()
    q = np.zeros((4, 32), np.float32)
    for call in (lambda: seq.attend(0, q), seq.step, lambda: seq.gather(0, 0), seq.fork, seq.park,
                 seq.unpark, seq.stats, lambda: seq.head_level(0, 0)):
        with pytest.raises(kvpager.PermissionDenied):
            call()


def test_a_dropped_sequence_is_closed_by_the_collector(tenant):
    seq = tenant.sequence(SHAPE)
    fill(seq, 0, 40, seed=2)
    assert tenant.stats().tokens_retained == 40 * 2 * 2
    del seq
    gc.collect()
    assert tenant.stats().tokens_retained == 0
    assert tenant.stats().bytes_exact == 0


def test_a_dropped_tenant_is_closed_by_the_collector(pool):
    pool.tenant("a")  # not kept
    gc.collect()
    pool.tenant("a").close()  # the name is free again


def test_a_sequence_keeps_its_pool_alive():
    tenant = kvpager.Pool().tenant("a")  # the pool object is referenced only by its tenant
    seq = tenant.sequence(SHAPE)
    del tenant
    gc.collect()
    fill(seq, 0, 8, seed=3)
    assert seq.stats().tokens_retained == 8 * 2 * 2
    seq.tenant.pool.close()


def test_a_fork_outlives_its_source(tenant):
    src = tenant.sequence(SHAPE)
    fill(src, 0, 50, seed=4)
    before = attend_all(src)
    fork = src.fork()
    src.close()
    np.testing.assert_array_equal(attend_all(fork), before)
    fork.close()
    assert tenant.stats().bytes_exact == 0


def test_a_collected_sequence_never_waits_for_its_tenants_lock(pool):
    """The collector may finalize a sequence on any thread, at any point, even while another thread holds
    its tenant (closing it, or opening a sequence): the finalizer must not block on that lock, or two
    threads can each wait for the other. Its close waits for the tenant's next call instead."""
    import threading

    tenant = pool.tenant("a")
    seq = tenant.sequence(SHAPE)
    fill(seq, 0, 8, seed=3)
    held, release = threading.Event(), threading.Event()

    def hold_the_tenant():
        with tenant._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_tenant)
    holder.start()
    held.wait(10)
    finalizer = threading.Thread(target=lambda: (seq.__del__()))
    finalizer.start()
    finalizer.join(5)
    blocked = finalizer.is_alive()
    release.set()
    holder.join(10)
    finalizer.join(10)
    assert not blocked, "the finalizer waited for the tenant's lock"
    assert tenant.stats().tokens_retained == 0, "the tenant's next call closed the sequence in C"
    assert seq.closed
