"""Codecs and policies on their own: round trips, dots on codes, scores, observations."""

import numpy as np
import pytest

import kvpager
from conftest import SHAPE


def vectors(n, dim=128, seed=1):
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def test_turboquant_round_trip_stays_close():
    x = vectors(64)
    with kvpager.Codec("turboquant(bits=4)", 128) as codec:
        codes = codec.encode(x)
        assert codes.dtype == np.uint8 and codes.shape == (codec.nbytes(64),)
        assert codes.nbytes < x.nbytes / 6
        y = codec.decode(codes)
    error = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert error.max() < 0.15


def test_fp32_round_trip_is_exact():
    x = vectors(10, dim=24)
    codec = kvpager.Codec("fp32", 24)
    np.testing.assert_array_equal(codec.decode(codec.encode(x), 10), x)


def test_dot_on_codes_matches_the_decoded_vectors():
    x, q = vectors(32), vectors(1, seed=2)[0]
    codec = kvpager.Codec("turboquant(bits=3)", 128)
    codes = codec.encode(x)
    np.testing.assert_allclose(codec.dot(codes, q), codec.decode(codes) @ q, rtol=1e-4, atol=1e-3)
    exact = x @ q
    assert np.corrcoef(codec.dot(codes, q), exact)[0, 1] > 0.95


def test_kivi_takes_whole_groups():
    codec = kvpager.Codec("kivi(bits=4,group=32)", 64)
    assert codec.group == 32
    with pytest.raises(ValueError, match="not a multiple of the codec's group of 32"):
        codec.encode(vectors(40, 64))
    x = vectors(64, 64)
    y = codec.decode(codec.encode(x))
    assert y.shape == (64, 64)
    assert np.abs(y - x).max() < 0.5


def test_codes_no_encoder_writes_are_refused():
    codec = kvpager.Codec("turboquant(bits=3)", 64)
    codes = codec.encode(vectors(4, 64))
    stride = codec.nbytes(1)
    codes[2 * stride:2 * stride + 4] = 0xFF  # token 2's norm: a NaN
    with pytest.raises(kvpager.Corrupt, match="token 2's norm of part 0 is -?nan"):
        codec.decode(codes)
    with pytest.raises(kvpager.Corrupt, match="kvp_codec_dot"):
        codec.dot(codes, np.zeros(64, dtype=np.float32))


def test_codec_arguments_are_checked():
    codec = kvpager.Codec("fp16", 16)
    with pytest.raises(ValueError, match="^x: shape is \\(3, 8\\), expected \\(3, 16\\)"):
        codec.encode(vectors(3, 8))
    codes = codec.encode(vectors(3, 16))
    with pytest.raises(ValueError, match="^codes: shape"):
        codec.decode(codes, 4)
    with pytest.raises(ValueError, match="^q: dtype"):
        codec.dot(codes, np.zeros(16))
    with pytest.raises(kvpager.InvalidArgument, match="turboquant"):
        kvpager.Codec("turboquant(bits=9)", 16)


def test_h2o_scores_follow_observed_attention():
    policy = kvpager.Policy("h2o(heavy=0.1,recent=0.1)", SHAPE)
    pos = np.arange(20, dtype=np.int32)
    k = vectors(20, 32)
    np.testing.assert_array_equal(policy.score(0, 1, 20, pos, k), np.zeros(20, np.float32))
    weights = np.full((2, 20), 0.01, np.float32)
    weights[:, 3] = 0.81
    policy.observe(0, 1, 20, pos=pos, weights=weights)
    scores = policy.score(0, 1, 21, pos, k)
    assert int(np.argmax(scores)) == 3
    assert scores[3] == pytest.approx(1.62)
    assert policy.score(1, 1, 21, pos, k).max() == 0  # another stream saw nothing


def test_policy_arguments_are_checked():
    policy = kvpager.Policy("streaming(sinks=2,window=4)", SHAPE)
    pos = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match="^k: shape"):
        policy.score(0, 0, 8, pos, vectors(7, 32))
    with pytest.raises(ValueError, match="^weights: given without pos"):
        policy.observe(0, 0, 8, weights=np.zeros((2, 8), np.float32))
    with pytest.raises(kvpager.InvalidArgument, match="t0=5"):
        policy.score(0, 0, 5, pos, vectors(8, 32))
    with pytest.raises(kvpager.InvalidArgument):
        kvpager.Policy("lru()", SHAPE)


def test_head_levels_follow_the_override(pool):
    seq = pool.tenant("g", "block=16,window=16,gate=entropy,policy=h2o(heavy=0.1,recent=0.1)").sequence(SHAPE)
    rng = np.random.default_rng(3)
    for pos in range(48):
        for layer in range(2):
            k, v = rng.standard_normal((2, 2, 32), dtype=np.float32)
            seq.append(layer, pos, k, v)
            seq.attend(layer, rng.standard_normal((4, 32), dtype=np.float32))
        seq.step()
    measured = seq.head_level(0, 0)
    assert not measured.overridden and 0 <= measured.coherence <= 1
    assert measured.aggressiveness == measured.coherence and measured.budget > 0
    seq.set_head_level(0, 0, 0.75)
    seq.step()
    pinned = seq.head_level(0, 0)
    assert pinned.overridden and pinned.aggressiveness == 0.75
    seq.set_head_level(0, 0, None)
    seq.step()
    assert not seq.head_level(0, 0).overridden
