/*
 * Freed block memory is unreachable from another tenant (pager/arena.c says why it is not zeroed): one
 * tenant fills its blocks with a marker and frees them; another tenant's new sequence never shows the
 * marker, through gather or attention, nor in the rows its blocks expose, and its blocks come from its
 * own arena.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"

TestSuite(isolation);

#define LAYERS 2
#define HEADS 4
#define KV 2
#define DIM 32
#define ROW (KV * DIM)
#define TOKENS 300

static const kvp_shape shape = { LAYERS, HEADS, KV, DIM, 10000.0f, KVP_ROPE_HALF };
static const float marker = 1234.5f;

static void fill(kvp_seq *s, float value)
{
	static float k[TOKENS * ROW], v[TOKENS * ROW];
	int32_t pos[TOKENS];
	for (int i = 0; i < TOKENS; i++)
		pos[i] = i;
	for (size_t i = 0; i < TOKENS * ROW; i++)
		k[i] = v[i] = value + (float)(i % 7) * (value == marker ? 0.0f : 0.125f);
	for (uint32_t l = 0; l < LAYERS; l++)
		cr_assert_eq(kvp_append(s, l, TOKENS, pos, k, v), KVP_OK, "%s", kvp_last_error());
}

static unsigned arena_of(const kvp_pool *p, const void *ptr)
{
	unsigned arena = UINT32_MAX;
	size_t sz = sizeof arena;
	cr_assert_eq(p->je->mallctl("arenas.lookup", &arena, &sz, (void *)&ptr, sizeof ptr), 0);
	return arena;
}

static int rows_hold_marker(const struct kvp_block *b)
{
	const unsigned char *k = b->k, *v = b->v;
	size_t bytes = (size_t)b->n * DIM * sizeof(float);
	for (size_t at = 0; at + sizeof marker <= bytes; at += sizeof marker)
		if (!memcmp(k + at, &marker, sizeof marker) || !memcmp(v + at, &marker, sizeof marker))
			return 1;
	return 0;
}

/* B's sequence: gathered tokens, attention and every block's readable rows free of A's marker, and
 * every block in B's arena. */
static void assert_clean(kvp_pool *p, kvp_tenant *b, kvp_seq *h)
{
	static float k[TOKENS * DIM], v[TOKENS * DIM];
	float q[HEADS * DIM], out[HEADS * DIM];
	int32_t pos[TOKENS];
	uint32_t n;
	struct kvp_seq *s = kvp_seq_from_handle(h);
	for (int i = 0; i < HEADS * DIM; i++)
		q[i] = 0.01f * (float)i;
	for (uint32_t l = 0; l < LAYERS; l++) {
		cr_assert_eq(kvp_attend(h, l, q, out), KVP_OK);
		for (int i = 0; i < HEADS * DIM; i++)
			cr_assert(out[i] < 100.0f, "attention never sees the marker");
		for (uint32_t g = 0; g < KV; g++) {
			const struct kvp_stream *st = kvp_seq_stream(s, l, g);
			cr_assert_eq(kvp_gather(h, l, g, TOKENS, pos, k, v, &n), KVP_OK);
			for (uint32_t i = 0; i < n * DIM; i++)
				cr_assert(k[i] != marker && v[i] != marker, "gathered token %u", i / DIM);
			for (uint32_t i = 0; i <= st->n_blocks; i++) {
				const struct kvp_block *blk = i ? st->blocks[i - 1] : st->sink;
				cr_assert_eq(arena_of(p, blk->k), b->arena, "block rows come from the tenant's arena");
				cr_assert_eq(arena_of(p, blk), b->arena, "and so does its header");
				cr_assert(!rows_hold_marker(blk), "rows [0, n) are the owner's bytes");
			}
		}
	}
}

Test(isolation, a_freed_sequences_memory_never_reaches_another_tenants_new_sequence)
{
	kvp_pool *p;
	kvp_tenant *a, *b;
	kvp_seq *sa, *sb;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "block=16,sinks=4", &a), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "b", "block=16,sinks=4", &b), KVP_OK);
	cr_assert_neq(a->arena, b->arena, "one arena per tenant");
	for (int round = 0; round < 3; round++) {
		cr_assert_eq(kvp_seq_open(a, &shape, &sa), KVP_OK);
		fill(sa, marker);
		kvp_seq_close(sa); /* its blocks go back to a's arena */
		cr_assert_eq(kvp_seq_open(b, &shape, &sb), KVP_OK);
		fill(sb, 0.25f);
		assert_clean(p, b, sb);
		kvp_seq_close(sb);
	}
	kvp_pool_close(p);
}

Test(isolation, a_closed_tenants_memory_never_reaches_a_tenant_opened_after_it)
{
	kvp_pool *p;
	kvp_tenant *a, *b;
	kvp_seq *sa, *sb;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "block=16,sinks=4", &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(a, &shape, &sa), KVP_OK);
	fill(sa, marker);
	kvp_seq_close(sa);
	kvp_tenant_close(a); /* its arena is destroyed */
	cr_assert_eq(kvp_tenant_open(p, "b", "block=16,sinks=4", &b), KVP_OK);
	cr_assert_eq(kvp_seq_open(b, &shape, &sb), KVP_OK);
	fill(sb, 0.25f);
	assert_clean(p, b, sb);
	kvp_pool_close(p);
}
