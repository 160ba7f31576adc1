"""Park and unpark through a spill file: all blocks out and back, attention bit-identical."""

import numpy as np
import pytest

import kvpager
from conftest import SHAPE, attend_all, fill


def test_unpark_gives_back_bit_identical_attention(spill_pool):
    tenant = spill_pool.tenant("t", "block=16,window=32,k=turboquant(bits=3)")
    seq = tenant.sequence(SHAPE)
    fill(seq, 0, 120, seed=1)
    before, resident = attend_all(seq), seq.stats()
    seq.park()
    parked = seq.stats()
    assert parked.bytes_spilled > 0
    assert parked.bytes_exact + parked.bytes_compressed < resident.bytes_exact + resident.bytes_compressed
    seq.unpark()
    np.testing.assert_array_equal(attend_all(seq), before)
    assert seq.stats().bytes_spilled == 0


def test_a_parked_sequence_refuses_appends_and_attention(spill_pool):
    seq = spill_pool.tenant("t").sequence(SHAPE)
    fill(seq, 0, 70, seed=2)
    seq.park()
    with pytest.raises(kvpager.InvalidArgument, match="parked"):
        fill(seq, 70, 1, seed=3)
    with pytest.raises(kvpager.InvalidArgument, match="parked"):
        seq.attend(0, np.zeros((4, 32), np.float32))
    seq.park()  # twice: a no-op
    seq.unpark()
    fill(seq, 70, 1, seed=3)
    assert seq.stats().tokens_retained == 71 * 2 * 2


def test_closing_a_parked_sequence_frees_its_slots(spill_pool):
    tenant = spill_pool.tenant("t")
    seq = tenant.sequence(SHAPE)
    fill(seq, 0, 70, seed=4)
    seq.park()
    assert tenant.stats().bytes_spilled > 0
    seq.close()
    assert tenant.stats().bytes_spilled == 0
