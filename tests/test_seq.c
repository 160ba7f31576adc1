/* Sequences: append and gather, tiers, fork with copy-on-write, and byte accounting. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "base/base.h"
#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"

static const kvp_shape shape = { 3, 8, 2, 32, 10000.0f, KVP_ROPE_HALF };
#define ROW (2 * 32)

static kvp_pool *pool;
static kvp_tenant *tenant;

static void open_tenant(const char *spec)
{
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &tenant), KVP_OK, "%s", kvp_last_error());
}

/* A sequence of `shape` in a new pool's tenant opened with spec. */
static kvp_seq *seq_in(const char *spec)
{
	kvp_seq *s;
	open_tenant(spec);
	cr_assert_eq(kvp_seq_open(tenant, &shape, &s), KVP_OK, "%s", kvp_last_error());
	return s;
}

static void append_range(kvp_seq *s, uint32_t layer, int32_t first, uint32_t n, float *k, float *v, uint64_t seed)
{
	int32_t *pos = malloc(n * sizeof *pos);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = first + (int32_t)i;
	fixture_fill(k, (size_t)n * ROW, seed, 2);
	fixture_fill(v, (size_t)n * ROW, seed + 1000, 2);
	cr_assert_eq(kvp_append(s, layer, n, pos, k, v), KVP_OK, "%s", kvp_last_error());
	free(pos);
}

/* Element j of KV head g of token i in an append buffer. */
static float at(const float *x, uint32_t i, uint32_t g, uint32_t j)
{
	return x[(size_t)i * ROW + g * 32 + j];
}

Test(seq, gather_returns_appended_tokens_in_order_across_tiers)
{
	static float k[300 * ROW], v[300 * ROW], gk[300 * 32], gv[300 * 32];
	int32_t pos[300];
	uint32_t n;
	kvp_seq *s;
	s = seq_in("block=16,sinks=4,window=32");
	/* prefill in one call, then decode one at a time: both paths fill sink, blocks and tail */
	append_range(s, 1, 0, 37, k, v, 1);
	for (uint32_t i = 37; i < 300; i++)
		append_range(s, 1, (int32_t)i, 1, k + (size_t)i * ROW, v + (size_t)i * ROW, 10 + i);
	for (uint32_t g = 0; g < 2; g++) {
		cr_assert_eq(kvp_gather(s, 1, g, 300, pos, gk, gv, &n), KVP_OK);
		cr_assert_eq(n, 300);
		for (uint32_t i = 0; i < n; i++) {
			cr_assert_eq(pos[i], (int32_t)i);
			for (uint32_t j = 0; j < 32; j++) {
				cr_assert_eq(gk[i * 32 + j], at(k, i, g, j), "fp32 store is exact");
				cr_assert_eq(gv[i * 32 + j], at(v, i, g, j));
			}
		}
	}
	cr_assert_eq(kvp_gather(s, 0, 0, 300, pos, gk, gv, &n), KVP_OK);
	cr_assert_eq(n, 0, "layers are independent");
	kvp_pool_close(pool);
}

Test(seq, fp16_store_rounds_each_element_once)
{
	static float k[70 * ROW], v[70 * ROW], gk[70 * 32], gv[70 * 32];
	uint32_t n;
	kvp_seq *s;
	s = seq_in("store=fp16,block=8");
	append_range(s, 0, 100, 70, k, v, 5);
	cr_assert_eq(kvp_gather(s, 0, 1, 70, NULL, gk, gv, &n), KVP_OK);
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = 0; j < 32; j++) {
			cr_assert_eq(gk[i * 32 + j], kvp_f16_to_f32(kvp_f32_to_f16(at(k, i, 1, j))));
			cr_assert_eq(gv[i * 32 + j], kvp_f16_to_f32(kvp_f32_to_f16(at(v, i, 1, j))));
		}
	kvp_pool_close(pool);
}

Test(seq, gather_refuses_a_small_buffer_and_reports_the_count)
{
	static float k[10 * ROW], v[10 * ROW];
	uint32_t n = 0;
	kvp_seq *s;
	s = seq_in("");
	append_range(s, 2, 0, 10, k, v, 1);
	cr_assert_eq(kvp_gather(s, 2, 0, 9, NULL, NULL, NULL, &n), KVP_EINVAL);
	cr_assert_eq(n, 10);
	cr_assert_eq(kvp_gather(s, 3, 0, 9, NULL, NULL, NULL, &n), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "layer 3"), "%s", kvp_last_error());
	kvp_pool_close(pool);
}

/* n counts the tokens of k and v, so n past what a stream can count is refused before a byte of them is
 * read: nothing is appended, and gather reports the tokens its buffer was sized for. */
Test(seq, appends_too_large_to_count_are_einval_and_change_nothing)
{
	static float k[8 * ROW], v[8 * ROW], gk[8 * 32];
	const uint32_t huge[] = { UINT32_MAX, UINT32_MAX - 4, UINT32_MAX - 63, 1u << 31 };
	int32_t pos[8] = { 100, 101, 102, 103, 104, 105, 106, 107 };
	kvp_stats st = { .size = sizeof st };
	uint32_t n = 0;
	kvp_seq *s;
	s = seq_in("block=64");
	append_range(s, 0, 0, 5, k, v, 1);
	/* layer 1 first, empty: there n + block - 1 used to wrap and the append "succeeded" */
	for (uint32_t layer = 1; layer != UINT32_MAX; layer--)
		for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
			cr_assert_eq(kvp_append(s, layer, huge[i], pos, k, v), KVP_EINVAL, "layer %u, n=%u", layer, huge[i]);
			cr_assert(strstr(kvp_last_error(), "n="), "%s", kvp_last_error());
		}
	/* one past what a stream may hold, counting the 5 it has */
	cr_assert_eq(kvp_append(s, 0, INT32_MAX - 4, pos, k, v), KVP_EINVAL);
	for (uint32_t g = 0; g < 2; g++) {
		cr_assert_eq(kvp_gather(s, 0, g, 8, NULL, gk, NULL, &n), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(n, 5);
		cr_assert_eq(kvp_gather(s, 1, g, 8, NULL, gk, NULL, &n), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(n, 0);
	}
	cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK);
	cr_assert_eq(st.tokens_appended, 5 * 2);
	cr_assert_eq(st.tokens_retained, 5 * 2);
	kvp_pool_close(pool);
}

/* A count the stream can hold but memory cannot fails its plan before any token is written. */
Test(seq, a_huge_append_over_the_quota_is_enomem_and_changes_nothing)
{
	static float k[8 * ROW], v[8 * ROW];
	int32_t pos[8] = { 0 };
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	kvp_seq *s;
	s = seq_in("quota=1MiB");
	append_range(s, 0, 0, 5, k, v, 1);
	cr_assert_eq(kvp_tenant_stats(tenant, &before), KVP_OK);
	cr_assert_eq(kvp_append(s, 0, INT32_MAX - 5, pos, k, v), KVP_ENOMEM, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_stats(tenant, &after), KVP_OK);
	cr_assert_eq(memcmp(&before, &after, sizeof before), 0, "nothing charged or counted");
	kvp_pool_close(pool);
}

Test(seq, bad_arguments_are_refused_without_effect)
{
	float k[ROW] = { 0 }, v[ROW] = { 0 };
	int32_t pos = 0;
	uint32_t n;
	kvp_seq *s;
	s = seq_in("");
	cr_assert_eq(kvp_append(s, 3, 1, &pos, k, v), KVP_EINVAL);
	cr_assert_eq(kvp_append(s, 0, 1, NULL, k, v), KVP_EINVAL);
	cr_assert_eq(kvp_append(NULL, 0, 1, &pos, k, v), KVP_EINVAL);
	cr_assert_eq(kvp_attend(NULL, 0, k, v), KVP_EINVAL);
	cr_assert_eq(kvp_seq_step(NULL), KVP_EINVAL);
	cr_assert_eq(kvp_seq_park(s), KVP_EUNSUPPORTED);
	cr_assert(strlen(kvp_last_error()) > 0);
	cr_assert_eq(kvp_gather(s, 0, 0, 1, NULL, NULL, NULL, &n), KVP_OK);
	cr_assert_eq(n, 0);
	kvp_pool_close(pool);
}

/* A key or value that is not finite is refused with its place named, and nothing of the call is
 * appended (under a cold tier it would otherwise stay exact unseen, its codec refusing it). */
Test(seq, non_finite_keys_and_values_are_refused_and_nothing_is_appended)
{
	static const float bad[] = { NAN, INFINITY, -INFINITY };
	float k[10 * ROW], v[10 * ROW];
	int32_t pos[3] = { 10, 11, 12 };
	kvp_seq *s;
	s = seq_in("block=4,window=4,k=turboquant(bits=3),v=turboquant(bits=3)");
	append_range(s, 0, 0, 10, k, v, 3);
	for (unsigned i = 0; i < 3; i++) {
		fixture_fill(k, 3 * ROW, 5, 2);
		fixture_fill(v, 3 * ROW, 6, 2);
		(i == 2 ? k : v)[2 * ROW + 32 + 7] = bad[i]; /* token 2, KV head 1, channel 7 */
		cr_assert_eq(kvp_append(s, 0, 3, pos, k, v), KVP_EINVAL, "%g", (double)bad[i]);
		cr_assert(strstr(kvp_last_error(), i == 2 ? "k of token 2 (position 12), KV head 1, channel 7"
							  : "v of token 2 (position 12), KV head 1, channel 7"),
			  "%s", kvp_last_error());
		kvp_stats st = { .size = sizeof st };
		cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK);
		cr_assert_eq(st.tokens_appended, 10 * 2, "nothing of the refused call");
	}
	append_range(s, 0, 10, 3, k, v, 7);
	kvp_pool_close(pool);
}

/* With store=fp16 a value that would round to an infinity (65520 and above) is refused too; 65504, the
 * largest binary16, and 65519, which rounds to it, are kept. */
Test(seq, values_beyond_fp16_are_refused_where_store_is_fp16)
{
	float k[ROW], v[ROW], gk[2 * 32];
	int32_t pos[2] = { 0, 1 };
	uint32_t n;
	kvp_seq *s;
	s = seq_in("store=fp16");
	fixture_fill(k, ROW, 13, 2);
	fixture_fill(v, ROW, 14, 2);
	k[3] = 65504.0f, k[4] = -65519.0f;
	cr_assert_eq(kvp_append(s, 0, 1, pos, k, v), KVP_OK, "%s", kvp_last_error());
	v[32 + 1] = -65520.0f;
	cr_assert_eq(kvp_append(s, 0, 1, pos + 1, k, v), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "v of token 0 (position 1), KV head 1, channel 1 is -65520") &&
			  strstr(kvp_last_error(), "within +-65504 with store=fp16"),
		  "%s", kvp_last_error());
	cr_assert_eq(kvp_gather(s, 0, 0, 2, NULL, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 1);
	cr_assert(gk[3] == 65504.0f && gk[4] == -65504.0f, "%g %g", (double)gk[3], (double)gk[4]);
	kvp_pool_close(pool);
	s = seq_in("store=fp32"); /* fp32 holds it */
	cr_assert_eq(kvp_append(s, 0, 1, pos + 1, k, v), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
}

/* A query that is not finite is refused before any score is made (an observing policy would keep them). */
Test(seq, non_finite_queries_are_refused)
{
	float k[4 * ROW], v[4 * ROW], q[8 * 32], out[8 * 32];
	kvp_seq *s;
	s = seq_in("policy=h2o(heavy=0.5,recent=0.25)");
	append_range(s, 1, 0, 4, k, v, 9);
	fixture_fill(q, 8 * 32, 11, 2);
	cr_assert_eq(kvp_attend(s, 1, q, out), KVP_OK, "%s", kvp_last_error());
	q[5 * 32 + 3] = NAN;
	out[0] = 42.0f;
	cr_assert_eq(kvp_attend(s, 1, q, out), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "q of head 5, channel 3 is nan"), "%s", kvp_last_error());
	cr_assert_eq(out[0], 42.0f, "nothing written");
	kvp_pool_close(pool);
}

/* Buffers a call writes must not overlap what it reads or another it writes: attention in place would zero
 * a KV head's queries before scoring them, and a gather into one buffer for k and v would keep only v. */
Test(seq, overlapping_buffers_are_refused)
{
	float k[4 * ROW], v[4 * ROW], q[8 * 32 + 32], gk[4 * 32 + 8];
	int32_t pos[4];
	uint32_t n;
	kvp_seq *s;
	s = seq_in("");
	append_range(s, 0, 0, 4, k, v, 17);
	fixture_fill(q, 8 * 32, 19, 2);
	cr_assert_eq(kvp_attend(s, 0, q, q), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "q and out overlap"), "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(s, 0, q, q + 32), KVP_EINVAL, "a partial overlap too");
	cr_assert_eq(kvp_gather(s, 0, 1, 4, pos, gk, gk, &n), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "overlap"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gather(s, 0, 1, 4, (int32_t *)(void *)(gk + 4 * 32), gk, NULL, &n), KVP_OK,
		     "adjacent, not overlapping: %s", kvp_last_error());
	cr_assert_eq(n, 4);
	kvp_pool_close(pool);
}

/* Another thread's call in progress is the sequence entered as the call does (tier/pressure.c), so the
 * overlap does not depend on timing. */
Test(seq, a_call_while_another_is_in_the_sequence_is_ebusy_and_does_nothing)
{
	float k[2 * ROW], v[2 * ROW], q[8 * 32], out[8 * 32];
	int32_t pos[2] = { 2, 3 };
	kvp_stats stats = { .size = sizeof stats };
	struct kvp_seq_obj *obj;
	struct kvp_call held;
	kvp_seq *s, *f;
	s = seq_in("");
	append_range(s, 0, 0, 2, k, v, 23);
	cr_assert_eq(kvp_seq_handle_get(s, "test", &obj), KVP_OK);
	cr_assert_eq(kvp_seq_enter(obj, &held), 0);
	cr_assert_eq(kvp_append(s, 0, 2, pos, k, v), KVP_EBUSY);
	cr_assert(strstr(kvp_last_error(), "kvp_append: another call on this sequence is in progress"), "%s",
		  kvp_last_error());
	fixture_fill(q, 8 * 32, 29, 2);
	memset(out, 0x7f, sizeof out);
	cr_assert_eq(kvp_attend(s, 0, q, out), KVP_EBUSY);
	for (size_t i = 0; i < sizeof out / sizeof out[0]; i++)
		cr_assert_eq(((uint8_t *)out)[4 * i], 0x7f, "out untouched");
	cr_assert_eq(kvp_seq_stats(s, &stats), KVP_EBUSY);
	cr_assert_eq(kvp_seq_fork(s, &f), KVP_EBUSY);
	cr_assert_eq(kvp_seq_step(s), KVP_EBUSY);
	kvp_seq_close(s);
	cr_assert(strstr(kvp_last_error(), "kvp_seq_close: another call"), "%s", kvp_last_error());
	kvp_seq_leave(obj);
	cr_assert_eq(kvp_seq_stats(s, &stats), KVP_OK, "the close left it open: %s", kvp_last_error());
	cr_assert_eq(stats.tokens_appended, 2 * 2, "the refused append added nothing");
	cr_assert_eq(kvp_append(s, 0, 2, pos, k, v), KVP_OK, "once the other call left: %s", kvp_last_error());
	kvp_seq_close(s);
	cr_assert_eq(kvp_seq_stats(s, &stats), KVP_EPERM, "closed now");
	kvp_pool_close(pool);
}

Test(fork, shares_blocks_until_either_side_writes)
{
	static float k[100 * ROW], v[100 * ROW], k2[ROW], v2[ROW], k3[ROW], v3[ROW], gk[101 * 32];
	int32_t pos[101];
	uint32_t n;
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	kvp_seq *a, *b;
	open_tenant("block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &shape, &a), KVP_OK);
	append_range(a, 0, 0, 100, k, v, 7);
	cr_assert_eq(kvp_tenant_stats(tenant, &before), KVP_OK);
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_stats(tenant, &after), KVP_OK);
	cr_assert_eq(after.bytes_exact, before.bytes_exact, "a fork copies no token storage");

	append_range(b, 0, 100, 1, k2, v2, 8);
	cr_assert_eq(kvp_tenant_stats(tenant, &after), KVP_OK);
	/* 100 tokens = 4 sinks + 6 blocks of 16: the tail block was full, so b got a fresh block */
	cr_assert_gt(after.bytes_exact, before.bytes_exact);
	append_range(a, 0, 100, 1, k3, v3, 9);

	cr_assert_eq(kvp_gather(b, 0, 1, 101, pos, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 101);
	cr_assert_eq(gk[50 * 32 + 3], at(k, 50, 1, 3), "shared history is the same");
	cr_assert_eq(gk[100 * 32 + 3], at(k2, 0, 1, 3), "b sees its own token");
	cr_assert_eq(kvp_gather(a, 0, 1, 101, pos, gk, NULL, &n), KVP_OK);
	cr_assert_eq(gk[100 * 32 + 3], at(k3, 0, 1, 3), "a sees its own token");
	kvp_pool_close(pool);
}

Test(fork, writing_a_shared_partial_block_copies_it_first)
{
	static float k[21 * ROW], v[21 * ROW], kb[ROW], vb[ROW], gk[22 * 32];
	uint32_t n;
	kvp_seq *a, *b;
	open_tenant("block=16,sinks=2");
	cr_assert_eq(kvp_seq_open(tenant, &shape, &a), KVP_OK);
	append_range(a, 0, 0, 21, k, v, 3); /* 2 sinks, one full block, one partial with 3 tokens */
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK);
	append_range(b, 0, 21, 1, kb, vb, 4);
	cr_assert_eq(kvp_gather(a, 0, 0, 22, NULL, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 21, "the source did not grow");
	cr_assert_eq(kvp_gather(b, 0, 0, 22, NULL, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 22);
	cr_assert_eq(gk[21 * 32], at(kb, 0, 0, 0));
	kvp_seq_close(a);
	cr_assert_eq(kvp_gather(b, 0, 0, 22, NULL, gk, NULL, &n), KVP_OK, "b outlives its source");
	cr_assert_eq(gk[20 * 32 + 5], at(k, 20, 0, 5));
	kvp_pool_close(pool);
}

Test(fork, sink_block_is_copied_on_write)
{
	static float k[3 * ROW], v[3 * ROW], kb[ROW], vb[ROW], gk[4 * 32];
	uint32_t n;
	kvp_seq *a, *b;
	open_tenant("block=16,sinks=8");
	cr_assert_eq(kvp_seq_open(tenant, &shape, &a), KVP_OK);
	append_range(a, 0, 0, 3, k, v, 3);
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK);
	append_range(b, 0, 3, 1, kb, vb, 4);
	cr_assert_eq(kvp_gather(a, 0, 0, 4, NULL, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 3);
	cr_assert_eq(kvp_gather(b, 0, 0, 4, NULL, gk, NULL, &n), KVP_OK);
	cr_assert_eq(n, 4);
	cr_assert_eq(gk[3 * 32 + 1], at(kb, 0, 0, 1));
	kvp_pool_close(pool);
}

Test(stats, count_allocated_bytes_and_tokens)
{
	static float k[130 * ROW], v[130 * ROW];
	kvp_stats ss = { .size = sizeof ss }, ts = { .size = sizeof ts };
	kvp_seq *s;
	s = seq_in("block=64,sinks=4,store=fp16");
	append_range(s, 0, 0, 130, k, v, 1);
	cr_assert_eq(kvp_seq_stats(s, &ss), KVP_OK);
	cr_assert_eq(kvp_tenant_stats(tenant, &ts), KVP_OK);
	cr_assert_eq(ss.tokens_appended, 130 * 2);
	cr_assert_eq(ss.tokens_retained, 130 * 2);
	cr_assert_eq(ss.bytes_dense_fp16, 130ull * 2 * 32 * 2 * 2);
	/* per stream: a 4-token sink block and 2 blocks of 64 rows of 32 halves, for K and V */
	cr_assert_eq(ss.bytes_exact, 2ull * (2 * 4 * 32 * 2 + 2 * 2 * 64 * 32 * 2));
	cr_assert_eq(ss.bytes_exact, ts.bytes_exact, "one sequence: its view and the tenant's agree");
	cr_assert_eq(ss.bytes_meta, ts.bytes_meta);
	cr_assert_gt(ss.bytes_meta, 0);
	kvp_pool_close(pool);
}

Test(stats, older_smaller_structs_are_filled_up_to_their_size)
{
	struct {
		uint32_t size;
		uint64_t tokens_appended;
		uint64_t guard;
	} old = { .size = sizeof(uint32_t) + 4 + sizeof(uint64_t), .guard = 0xabcdef };
	static float k[5 * ROW], v[5 * ROW];
	kvp_seq *s;
	s = seq_in("");
	append_range(s, 0, 0, 5, k, v, 1);
	cr_assert_eq(kvp_seq_stats(s, (kvp_stats *)&old), KVP_OK);
	cr_assert_eq(old.tokens_appended, 10);
	cr_assert_eq(old.guard, 0xabcdef, "nothing past size is written");
	old.size = 2;
	cr_assert_eq(kvp_seq_stats(s, (kvp_stats *)&old), KVP_EABI);
	kvp_pool_close(pool);
}
