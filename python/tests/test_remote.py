"""The remote tier through the binding: a pool with remote= publishes its prompts to a real redis-server,
which this suite starts on a free loopback port and stops; a fresh pool starts from what it holds."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

from conftest import SHAPE, attend_all
from test_prefix import append_prompt

TENANT = "model=tiny,block=16,sinks=4,window=32"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout.strip()


@pytest.fixture
def redis_port():
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        pytest.skip("redis-server is not installed (apt-get install redis-server redis-tools)")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="kvp-redis-")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if redis_cli(port, "PING") == "PONG":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"redis-server did not answer on port {port}")
        yield port
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_keys(port, n):
    for _ in range(200):
        if redis_cli(port, "DBSIZE") == str(n):
            return
        time.sleep(0.025)
    pytest.fail(f"the server holds {redis_cli(port, 'DBSIZE')} keys, not {n}")


def test_a_fresh_pool_starts_from_what_another_published(redis_port):
    import kvpager
    spec = f"remote=redis://127.0.0.1:{redis_port},remote_timeout=500"
    prompt = list(range(300, 370))
    with kvpager.Pool(spec) as first_pool:
        first = first_pool.tenant("t", TENANT).sequence(SHAPE, prompt=prompt)
        append_prompt(first, prompt, 0)
        first_pool.flush()
        stats = first_pool.remote_stats()
        assert (stats.queued, stats.published, stats.dropped) == (0, 5, 0)
        wait_for_keys(redis_port, 5)  # the sink unit and four blocks of 16 below token 69
        expected = attend_all(first)
    with kvpager.Pool(spec) as pool:
        tenant = pool.tenant("t", TENANT)
        second = tenant.sequence(SHAPE, prompt=np.array(prompt))
        assert second.n_cached == 4 + 4 * 16
        assert second.stats().remote_hit_tokens == 68
        append_prompt(second, prompt, second.n_cached)
        np.testing.assert_array_equal(attend_all(second), expected)
        assert tenant.stats().remote_faults == 0


def test_a_server_that_is_gone_is_a_miss(redis_port):
    import kvpager
    spec = f"remote=redis://127.0.0.1:{redis_port},remote_timeout=50"
    redis_cli(redis_port, "SHUTDOWN", "NOSAVE")
    with kvpager.Pool(spec) as pool:
        tenant = pool.tenant("t", TENANT)
        seq = tenant.sequence(SHAPE, prompt=list(range(70)))
        assert seq.n_cached == 0
        assert seq.stats().remote_faults == 1
        append_prompt(seq, list(range(70)), 0)


def test_flush_waits_for_a_server_that_pauses_its_writes(redis_port):
    import kvpager
    # a writer's patience of 3 s, longer than the pause however busy the machine
    spec = f"remote=redis://127.0.0.1:{redis_port},remote_timeout=3000"
    prompt = list(range(500, 570))
    with kvpager.Pool(spec) as pool:
        seq = pool.tenant("t", TENANT).sequence(SHAPE, prompt=prompt)  # looked up before the pause
        assert redis_cli(redis_port, "CLIENT", "PAUSE", "1000", "WRITE") == "OK"
        append_prompt(seq, prompt, 0)
        with pytest.raises(kvpager.Busy, match="still queued"):
            pool.flush(wait_ms=20)
        pool.flush()
        stats = pool.remote_stats()
        assert (stats.queued, stats.published, stats.dropped) == (0, 5, 0)
        assert stats.bytes_published > 0
    assert redis_cli(redis_port, "DBSIZE") == "5"


def test_without_a_remote_tier_flush_returns_and_stats_are_zero():
    import kvpager
    with kvpager.Pool("") as pool:
        pool.flush(wait_ms=0)
        assert pool.remote_stats() == kvpager.RemoteStats(0, 0, 0, 0, 0)
        with pytest.raises(ValueError, match="wait_ms"):
            pool.flush(wait_ms=-1)
    with pytest.raises(kvpager.PermissionDenied):
        pool.remote_stats()
