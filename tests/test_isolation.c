/*
 * Suite isolation: freed block memory of one tenant is never readable by another tenant's sequence.
 * The claim (tier/block.c) is "unreachable", not "zeroed": every tenant allocates from its own jemalloc
 * arena, so a freed block only ever comes back to the same tenant, and a closed tenant's arena is
 * destroyed, its pages given back to the system, which hands them out again zeroed. Within one tenant,
 * no call reads a block past the n rows its owner wrote.
 */
#include <criterion/criterion.h>
#include <jemalloc/jemalloc.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"

#define D 64
#define NKV 2
#define N 512

static const kvp_shape shape = { 1, 4, NKV, D, 1e4f, KVP_ROPE_HALF };
static const uint32_t pattern = 0x5a17c0deu;

static unsigned arena_of(const void *p)
{
	unsigned arena = ~0u;
	size_t sz = sizeof arena;

	cr_assert_eq(kvp_je_mallctl("arenas.lookup", &arena, &sz, &p, sizeof p), 0, "arenas.lookup");
	return arena;
}

static void fill_pattern(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		memcpy(&x[i], &pattern, sizeof pattern);
}

static kvp_seq *filled_seq(kvp_tenant *t, const float *k, const float *v)
{
	int32_t pos[N];
	kvp_seq *s;

	for (int i = 0; i < N; i++)
		pos[i] = i;
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(s, 0, N, pos, k, v), KVP_OK, "%s", kvp_last_error());
	return s;
}

/* Does any of the block's memory, header and rows, hold four pattern words in a row? */
static int holds_pattern(const struct kvp_block *b)
{
	const unsigned char *p = b->k;
	uint32_t run = 0, w;

	for (size_t at = 0; at + 4 <= b->data_size; at += 4) {
		memcpy(&w, p + at, 4);
		run = w == pattern ? run + 1 : 0;
		if (run == 4)
			return 1;
	}
	return 0;
}

Test(isolation, every_block_comes_from_its_own_tenants_arena)
{
	static float k[N * NKV * D], v[N * NKV * D];
	kvp_pool *pool;
	kvp_tenant *a, *b;

	fixture_fill(k, N * NKV * D, 1, 1.0f);
	fixture_fill(v, N * NKV * D, 2, 1.0f);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=16", &a), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "b", "block=16", &b), KVP_OK);
	struct kvp_seq_obj *sa = kvp_seq_from_handle(filled_seq(a, k, v));
	struct kvp_seq_obj *sb = kvp_seq_from_handle(filled_seq(b, k, v));
	const unsigned arena_a = kvp_tenant_from_handle(a)->arena, arena_b = kvp_tenant_from_handle(b)->arena;
	cr_assert_neq(arena_a, arena_b);
	for (uint32_t g = 0; g < NKV; g++)
		for (uint32_t i = 0; i < kvp_seq_stream(sa, 0, g)->n_blocks; i++) {
			cr_assert_eq(arena_of(kvp_seq_stream(sa, 0, g)->blocks[i]->k), arena_a);
			cr_assert_eq(arena_of(kvp_seq_stream(sb, 0, g)->blocks[i]->k), arena_b);
		}
	kvp_pool_close(pool);
}

/* Sequences of one token each: a block of 64 rows with 63 never written, so reused memory would show. */
static uint32_t blocks_holding_pattern(kvp_tenant *t, const float *one, int seqs)
{
	uint32_t found = 0;
	int32_t pos = 0;

	for (int i = 0; i < seqs; i++) {
		kvp_seq *h;
		cr_assert_eq(kvp_seq_open(t, &shape, &h), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_append(h, 0, 1, &pos, one, one), KVP_OK, "%s", kvp_last_error());
		struct kvp_seq_obj *s = kvp_seq_from_handle(h);
		for (uint32_t g = 0; g < NKV; g++)
			found += holds_pattern(kvp_seq_stream(s, 0, g)->blocks[0]);
	}
	return found;
}

Test(isolation, a_closed_tenants_bytes_never_appear_in_another_tenants_blocks)
{
	static float k[N * NKV * D], v[N * NKV * D], one[NKV * D];
	kvp_pool *pool;
	kvp_tenant *a, *b;
	uint32_t same, other;

	fill_pattern(k, N * NKV * D);
	fill_pattern(v, N * NKV * D);
	fixture_fill(one, NKV * D, 3, 1.0f);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "a", "block=64,sinks=0", &a), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "b", "block=64,sinks=0", &b), KVP_OK);
	/* within tenant a, freed rows come back unwritten (jemalloc does not clear them): the scan sees them */
	kvp_seq_close(filled_seq(a, k, v));
	same = blocks_holding_pattern(a, one, 64);
	/* tenant b never gets them, neither while a lives nor after a is closed */
	kvp_seq_close(filled_seq(a, k, v));
	other = blocks_holding_pattern(b, one, 64);
	kvp_tenant_close(a);
	other += blocks_holding_pattern(b, one, 256);
	cr_log_info("blocks holding freed bytes: %u in the same tenant, %u in another", same, other);
	cr_assert_gt(same, 0, "the scan must be able to see reused memory for the test to mean anything");
	cr_assert_eq(other, 0, "tenant b's blocks hold tenant a's bytes");
	/* and no call reads a block past the rows its owner wrote */
	kvp_seq *h;
	int32_t pos = 0, got_pos[64];
	uint32_t n = 0;
	float got[64 * D];
	cr_assert_eq(kvp_seq_open(b, &shape, &h), KVP_OK);
	cr_assert_eq(kvp_append(h, 0, 1, &pos, one, one), KVP_OK);
	cr_assert_eq(kvp_gather(h, 0, 0, 64, got_pos, got, NULL, &n), KVP_OK);
	cr_assert_eq(n, 1);
	kvp_pool_close(pool);
}
