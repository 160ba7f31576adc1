"""Threads: calls leave the GIL while in C, sequences of one tenant work side by side, and calls on
one sequence from several threads are serialized by its lock."""

import threading
import time

import numpy as np

import kvpager
from conftest import SHAPE, attend_all, fill


def run_threads(targets):
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def decode(seq, seed, steps=60):
    """A small decode loop: append one token, attend every layer, step; returns every output."""
    rng = np.random.default_rng(seed)
    outs = []
    for pos in range(steps):
        for layer in range(SHAPE.n_layers):
            k, v = rng.standard_normal((2, 2, 32), dtype=np.float32)
            seq.append(layer, pos, k, v)
            outs.append(seq.attend(layer, rng.standard_normal((4, 32), dtype=np.float32)))
        seq.step()
    return np.stack(outs)


def test_sequences_of_one_tenant_decode_in_parallel_threads_as_they_do_alone(pool):
    tenant = pool.tenant("shared", "block=16,window=16,k=turboquant(bits=4),policy=h2o(heavy=0.2,recent=0.2)")
    expected = []
    for seed in range(4):
        with tenant.sequence(SHAPE) as s:
            expected.append(decode(s, seed))
    seqs = [tenant.sequence(SHAPE) for _ in range(4)]
    got = [None] * 4

    def work(i):
        return lambda: got.__setitem__(i, decode(seqs[i], i))

    run_threads([work(i) for i in range(4)])
    for i in range(4):
        np.testing.assert_array_equal(got[i], expected[i])
    assert tenant.stats().tokens_appended == 4 * 60 * 2 * 2


def test_a_call_in_c_lets_other_python_threads_run(pool):
    """While one thread is inside a long kvp_append, another thread keeps running Python code: with
    the GIL held across the call it could not run at all in the middle of the call."""
    shape = kvpager.Shape(1, 8, 8, 128)
    seq = pool.tenant("long", "k=turboquant(bits=3),v=turboquant(bits=3)").sequence(shape)
    n = 4096
    k = np.random.default_rng(1).standard_normal((n, 8, 128), dtype=np.float32)
    pos = np.arange(n, dtype=np.int32)
    ticks, span, done = [], [], threading.Event()

    def spin():
        while not done.is_set():
            ticks.append(time.perf_counter())

    def append():
        span.append(time.perf_counter())
        seq.append(0, pos, k, k)
        span.append(time.perf_counter())
        done.set()

    run_threads([spin, append])
    start, end = span
    quarter = (end - start) / 4
    inside = [t for t in ticks if start + quarter < t < end - quarter]
    assert end - start > 0.01, "the append was too short to tell"
    assert len(inside) > 0
    assert seq.stats().tokens_appended == n * 8


def test_calls_on_one_sequence_from_many_threads_are_serialized(seq):
    fill(seq, 0, 200, seed=3)
    expected = attend_all(seq)
    results = []

    def attend_repeatedly():
        for _ in range(50):
            results.append(attend_all(seq))
            seq.stats()

    run_threads([attend_repeatedly] * 4)
    assert len(results) == 200
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_closing_the_pool_waits_for_calls_in_flight_on_other_threads():
    pool = kvpager.Pool()
    seq = pool.tenant("a").sequence(SHAPE)
    fill(seq, 0, 64, seed=4)
    outcomes = []

    def attend_until_closed():
        try:
            while True:
                attend_all(seq)
        except kvpager.PermissionDenied as e:
            outcomes.append(str(e))

    t = threading.Thread(target=attend_until_closed)
    t.start()
    time.sleep(0.05)
    pool.close()
    t.join()
    assert outcomes == ["the sequence is closed"]
