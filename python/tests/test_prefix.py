"""Prefix caching through the binding: Tenant.sequence(shape, prompt=tokens) and its stats."""

import numpy as np
import pytest

import kvpager
from conftest import SHAPE, attend_all, tokens


def append_prompt(seq, prompt, first):
    """Appends the prompt's tokens from position first on: each token's rows follow from its id and
    position, as a model's follow from the prefix."""
    pos = np.arange(first, len(prompt), dtype=np.int32)
    for layer in range(seq.shape.n_layers):
        rows = [tokens(np.random.default_rng([int(prompt[p]), int(p), layer]), 1) for p in pos]
        k = np.concatenate([r[0] for r in rows])
        v = np.concatenate([r[1] for r in rows])
        seq.append(layer, pos, k, v)


def test_a_second_sequence_of_a_prompt_starts_from_the_cache(pool):
    tenant = pool.tenant("p", "model=tiny,block=16,sinks=4,window=32")
    prompt = list(range(100, 170))
    first = tenant.sequence(SHAPE, prompt=prompt)
    assert first.n_cached == 0
    append_prompt(first, prompt, 0)
    second = tenant.sequence(SHAPE, prompt=np.array(prompt))
    assert second.n_cached == 4 + 4 * 16
    append_prompt(second, prompt, second.n_cached)
    np.testing.assert_array_equal(attend_all(first), attend_all(second))
    stats = tenant.stats()
    assert stats.prefix_hit_tokens == 68 and stats.prefix_miss_tokens == 68
    assert second.stats().prefix_hit_tokens == 68
    first.close()
    second.close()
    assert tenant.stats().bytes_cached > 0


def test_without_a_model_a_prompt_opens_a_plain_sequence(tenant):
    seq = tenant.sequence(SHAPE, prompt=[1, 2, 3])
    assert seq.n_cached == 0
    assert tenant.sequence(SHAPE).n_cached == 0


def test_a_bad_prompt_raises_naming_it(pool):
    tenant = pool.tenant("p", "model=tiny")
    for bad in ([], [[1, 2]], [1.5, 2.0], [1 << 40]):
        with pytest.raises(ValueError, match="prompt"):
            tenant.sequence(SHAPE, prompt=bad)


def test_a_bad_model_name_is_an_error_naming_it(pool):
    with pytest.raises(kvpager.InvalidArgument, match="model="):
        pool.tenant("p", "model=a(b)")
