"""Forks: copy-on-write duplicates that share blocks until either side writes."""

import numpy as np

from conftest import attend_all, fill


def test_a_fork_attends_as_its_source_did(seq):
    fill(seq, 0, 100, seed=1)
    with seq.fork() as fork:
        np.testing.assert_array_equal(attend_all(fork), attend_all(seq))
        assert fork.shape == seq.shape
        assert fork.tenant is seq.tenant


def test_writes_after_a_fork_stay_on_their_side(seq):
    fill(seq, 0, 40, seed=2)
    before = attend_all(seq)
    fork = seq.fork()
    fill(fork, 40, 10, seed=3)
    fill(seq, 40, 10, seed=4)
    np.testing.assert_array_equal(fork.gather(0, 1).pos, seq.gather(0, 1).pos)
    assert not np.array_equal(fork.gather(0, 1).k[40:], seq.gather(0, 1).k[40:])
    np.testing.assert_array_equal(fork.gather(0, 1).k[:40], seq.gather(0, 1).k[:40])
    fork.close()
    assert not np.array_equal(attend_all(seq), before)
    assert seq.stats().tokens_retained == 50 * 2 * 2


def test_shared_blocks_count_once_in_the_tenant(seq):
    fill(seq, 0, 64, seed=5)
    alone = seq.tenant.stats()
    fork = seq.fork()
    both = seq.tenant.stats()
    assert fork.stats().bytes_exact == seq.stats().bytes_exact
    assert both.bytes_exact == alone.bytes_exact
    assert both.tokens_retained == 2 * alone.tokens_retained


def test_gather_returns_the_appended_tokens(seq):
    rng = np.random.default_rng(6)
    k, v = rng.standard_normal((2, 5, 2, 32), dtype=np.float32)
    pos = np.array([3, 4, 5, 9, 12], np.int32)
    seq.append(1, pos, k, v)
    got = seq.gather(1, 1)
    np.testing.assert_array_equal(got.pos, pos)
    np.testing.assert_array_equal(got.k, k[:, 1])
    np.testing.assert_array_equal(got.v, v[:, 1])
    empty = seq.gather(0, 0)
    assert empty.pos.shape == (0,) and empty.k.shape == (0, 32)
