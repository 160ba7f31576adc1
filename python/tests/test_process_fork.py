"""os.fork(): the child is refused the pools, tenants and sequences its parent opened, and opens its own."""

import os
import signal
import threading
import time

import numpy as np

import kvpager
from conftest import SHAPE, attend_all, fill, query


def in_child(check):
    """Runs check() in a forked child; its exit status: 0 when it returned True."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if check() else 1
        except BaseException:  # noqa: BLE001 - the child reports by its status only
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_child_is_refused_its_parents_sequence_and_the_parent_goes_on(seq):
    fill(seq, 0, 40, seed=1)
    before = attend_all(seq)

    def refused():
        try:
            seq.attend(0, query(1))
        except kvpager.PermissionDenied as e:
            return "opened before this process forked" in str(e)
        return False

    assert in_child(refused) == 0
    np.testing.assert_array_equal(attend_all(seq), before)


def test_a_child_opens_a_pool_of_its_own(seq):
    fill(seq, 0, 10, seed=2)

    def own_pool():
        with kvpager.Pool("mem=64MiB") as pool:
            with pool.tenant("child").sequence(SHAPE) as s:
                fill(s, 0, 5, seed=3)
                return attend_all(s).shape == (2, 4, 32)

    assert in_child(own_pool) == 0


def test_a_child_forked_while_another_thread_held_a_sequence_is_not_stuck_on_its_lock(seq):
    fill(seq, 0, 10, seed=4)
    held, release = threading.Event(), threading.Event()

    def hold():
        with seq._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()

    def close_and_refuse():
        seq.close()
        try:
            seq.attend(0, query(1))
        except kvpager.PermissionDenied:
            return True
        return False

    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if close_and_refuse() else 1)
        status = None
        for _ in range(2000):  # 10 s: a child stuck on the parent's lock is killed and fails the test
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            time.sleep(0.005)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert status == 0
    assert not seq.closed
