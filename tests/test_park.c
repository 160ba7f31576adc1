/* kvp_seq_park / kvp_seq_unpark: bit-identical restores, freed memory, forks, and the parked state. */
#include <criterion/criterion.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "park_fixture.h"

TestSuite(park, .fini = spill_fixture_fini);
TestSuite(fork_park, .fini = spill_fixture_fini);

static void round_trip_is_bit_identical(const char *spill_max, const char *tenant_spec)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	static float gk[200 * PARK_DIM], gv[200 * PARK_DIM], hk[200 * PARK_DIM], hv[200 * PARK_DIM];
	int32_t gp[200], hp[200];
	uint32_t n, m;
	kvp_stats full, back;
	kvp_seq *s;
	park_open(spill_max, tenant_spec);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 150, 1); /* 4 sinks, 9 full blocks of 16, a tail of 2 */
	park_attend(s, before);
	cr_assert_eq(kvp_gather(s, 1, 1, 200, gp, gk, gv, &n), KVP_OK);
	full = park_tenant_stats();
	cr_assert_eq(full.bytes_compressed > 0, strstr(tenant_spec, ",k=") != NULL, "cold blocks exist iff k= is set");
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(park_tenant_stats().bytes_compressed + park_tenant_stats().bytes_exact, 0);
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	back = park_tenant_stats();
	cr_assert_eq(back.bytes_compressed, full.bytes_compressed);
	cr_assert_eq(back.bytes_exact, full.bytes_exact);
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "attention after unpark is bit-identical");
	cr_assert_eq(kvp_gather(s, 1, 1, 200, hp, hk, hv, &m), KVP_OK);
	cr_assert_eq(m, n);
	cr_assert_eq(memcmp(gp, hp, n * sizeof *gp), 0);
	cr_assert_eq(memcmp(gk, hk, n * PARK_DIM * sizeof *gk), 0);
	cr_assert_eq(memcmp(gv, hv, n * PARK_DIM * sizeof *gv), 0);
	park_close();
}

Test(park, unpark_restores_bit_identical_attention_fp32)
{
	round_trip_is_bit_identical("16MiB", "block=16,sinks=4");
}

Test(park, unpark_restores_bit_identical_attention_fp16)
{
	round_trip_is_bit_identical("16MiB", "block=16,sinks=4,store=fp16");
}

Test(park, unpark_restores_blocks_larger_than_the_staging_buffer)
{
	round_trip_is_bit_identical("16MiB", "block=4096,sinks=0"); /* one 1 MiB record per stream */
}

Test(park, unpark_restores_codec_encoded_cold_blocks_bit_identically)
{
	/* 150 tokens, window 32: most blocks are cold, their K and V codec bytes of different sizes */
	round_trip_is_bit_identical("16MiB", "block=32,sinks=4,window=32,k=kivi(bits=2),v=turboquant(bits=3)");
	round_trip_is_bit_identical("16MiB", "block=16,sinks=4,window=32,k=turboquant(bits=4),v=fp16");
}

Test(park, unpark_restores_bit_identical_attention_through_a_small_staging_buffer)
{
	/* 8 KiB halves: many batches, and the buffer grows for the 1 MiB records */
	round_trip_is_bit_identical("16MiB,spill_buffer=64KiB", "block=16,sinks=4");
	round_trip_is_bit_identical("16MiB,spill_buffer=64KiB", "block=4096,sinks=0");
}

Test(park, frees_block_memory_and_counts_spilled_bytes)
{
	kvp_stats full, parked, back, seq = { .size = sizeof seq };
	kvp_seq *s;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 7);
	full = park_tenant_stats();
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	parked = park_tenant_stats();
	cr_assert_eq(parked.bytes_exact, 0, "no token storage stays in memory");
	cr_assert_eq(parked.tokens_retained, full.tokens_retained, "parked tokens are still retained");
	/* per stream: a sink record and 6 block records of 16 rows (2 pages each: 64 B header + 64 B
	 * positions + 2 x 2 KiB), the sink record 1 page per 4-row buffer rounded: 4*4 + 2*512 + 64 */
	cr_assert_eq(parked.bytes_spilled, PARK_LAYERS * PARK_KV * (1 + 6 * 2) * 4096ull);
	cr_assert_eq(kvp_spill_pages_used(pool) * 4096, parked.bytes_spilled);
	cr_assert_eq(kvp_seq_stats(s, &seq), KVP_OK);
	cr_assert_eq(seq.bytes_spilled, parked.bytes_spilled);
	cr_assert_eq(seq.bytes_exact, 0);
	cr_assert_eq(seq.bytes_meta, parked.bytes_meta, "one sequence: its view and the tenant's agree");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	back = park_tenant_stats();
	cr_assert_eq(back.bytes_exact, full.bytes_exact);
	cr_assert_eq(back.bytes_spilled, 0);
	cr_assert_eq(kvp_spill_pages_used(pool), 0, "an unparked sequence keeps no slots");
	kvp_seq_close(s);
	back = park_tenant_stats();
	cr_assert_eq(back.bytes_exact + back.bytes_meta + back.bytes_spilled + back.tokens_retained, 0);
	park_close();
}

Test(park, a_parked_sequence_refuses_calls_that_need_its_tokens)
{
	float k[PARK_ROW] = { 0 }, v[PARK_ROW] = { 0 }, out[PARK_OUT];
	int32_t pos = 100;
	uint32_t n;
	kvp_seq *s, *f;
	park_open("1MiB", "block=16");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 40, 3);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "parking twice is a no-op");
	cr_assert_eq(kvp_append(s, 0, 1, &pos, k, v), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "kvp_append: the sequence is parked"), "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(s, 0, k, out), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "kvp_attend: the sequence is parked"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gather(s, 0, 0, 0, NULL, NULL, NULL, &n), KVP_EINVAL);
	cr_assert_eq(kvp_seq_fork(s, &f), KVP_EINVAL);
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "step has nothing to do while parked");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "unparking twice is a no-op");
	cr_assert_eq(kvp_append(s, 0, 1, &pos, k, v), KVP_OK, "%s", kvp_last_error());
	park_close();
}

Test(park, decoding_continues_after_unpark_as_if_never_parked)
{
	static float a[PARK_LAYERS * PARK_OUT], b[PARK_LAYERS * PARK_OUT];
	kvp_seq *s, *ref;
	park_open("4MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &ref), KVP_OK);
	park_fill(s, 0, 37, 11);
	park_fill(ref, 0, 37, 11);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	for (int32_t t = 37; t < 60; t++) { /* fills the restored partial tail, then new blocks */
		park_fill(s, t, 1, 100 + (uint64_t)t);
		park_fill(ref, t, 1, 100 + (uint64_t)t);
	}
	park_attend(s, a);
	park_attend(ref, b);
	cr_assert_eq(memcmp(a, b, sizeof a), 0);
	park_close();
}

Test(park, an_empty_sequence_parks_and_unparks)
{
	kvp_seq *s;
	float out[PARK_LAYERS * PARK_OUT];
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	park_attend(s, out);
	park_close();
}

Test(park, needs_a_spill_device)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "t", "", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &park_shape, &s), KVP_OK);
	cr_assert_eq(kvp_seq_park(s), KVP_EUNSUPPORTED);
	cr_assert(strstr(kvp_last_error(), "spill=PATH"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_park(NULL), KVP_EINVAL);
	cr_assert_eq(kvp_seq_unpark(NULL), KVP_EINVAL);
	kvp_pool_close(p);
}

Test(park, closing_parked_sequences_and_the_pool_gives_every_slot_back)
{
	kvp_seq *a, *b;
	park_open("4MiB", "block=16");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &b), KVP_OK);
	park_fill(a, 0, 70, 1);
	park_fill(b, 0, 70, 2);
	cr_assert_eq(kvp_seq_park(a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_park(b), KVP_OK, "%s", kvp_last_error());
	kvp_seq_close(a);
	cr_assert_gt(kvp_spill_pages_used(pool), 0);
	cr_assert_eq(kvp_spill_pages_used(pool) * 4096, park_tenant_stats().bytes_spilled);
	kvp_tenant_close(tenant); /* b is still parked: its records go with it */
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	park_close();
}

/* ---- forks ---- */

Test(fork_park, shared_blocks_are_written_once_and_shared_again_after_unpark)
{
	static float a0[PARK_LAYERS * PARK_OUT], b0[PARK_LAYERS * PARK_OUT], x[PARK_LAYERS * PARK_OUT];
	kvp_stats both, one;
	uint64_t pages_a, pages_ab;
	kvp_seq *a, *b;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	park_fill(a, 0, 100, 5); /* 4 sinks + 6 full blocks per stream */
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK, "%s", kvp_last_error());
	park_fill(b, 100, 10, 6); /* b's own block 7; the shared ones stay shared */
	park_attend(a, a0);
	park_attend(b, b0);
	both = park_tenant_stats();

	cr_assert_eq(kvp_seq_park(a), KVP_OK, "%s", kvp_last_error());
	pages_a = kvp_spill_pages_used(pool);
	cr_assert_eq(pages_a, PARK_LAYERS * PARK_KV * (1 + 6 * 2));
	one = park_tenant_stats();
	cr_assert_eq(one.bytes_exact, both.bytes_exact, "b still uses every block a parked");
	park_attend(b, x);
	cr_assert_eq(memcmp(x, b0, sizeof x), 0, "the sibling runs on while a is parked");

	cr_assert_eq(kvp_seq_park(b), KVP_OK, "%s", kvp_last_error());
	pages_ab = kvp_spill_pages_used(pool);
	cr_assert_eq(pages_ab - pages_a, PARK_LAYERS * PARK_KV * 2, "b wrote only its own block");
	cr_assert_eq(park_tenant_stats().bytes_exact, 0, "both parked: nothing in memory");
	cr_assert_eq(park_tenant_stats().bytes_spilled, pages_ab * 4096, "shared records count once");

	cr_assert_eq(kvp_seq_unpark(b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(park_tenant_stats().bytes_exact, both.bytes_exact, "the shared blocks are shared again");
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	park_attend(a, x);
	cr_assert_eq(memcmp(x, a0, sizeof x), 0);
	park_attend(b, x);
	cr_assert_eq(memcmp(x, b0, sizeof x), 0);
	park_close();
}

Test(fork_park, a_sibling_writing_after_the_park_does_not_change_the_parked_copy)
{
	static float a0[PARK_LAYERS * PARK_OUT], x[PARK_LAYERS * PARK_OUT];
	kvp_seq *a, *b;
	park_open("16MiB", "block=16,sinks=8");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	park_fill(a, 0, 5, 5);  /* a partial sink block */
	park_fill(a, 5, 20, 6); /* and a partial tail block */
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK);
	park_attend(a, a0);
	cr_assert_eq(kvp_seq_park(a), KVP_OK, "%s", kvp_last_error());
	park_fill(b, 25, 30, 7); /* writes into the sink and tail that a's records hold */
	cr_assert_eq(kvp_seq_park(b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(a), KVP_OK, "%s", kvp_last_error());
	park_attend(a, x);
	cr_assert_eq(memcmp(x, a0, sizeof x), 0);
	kvp_seq_close(a);
	kvp_seq_close(b);
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	cr_assert_eq(park_tenant_stats().bytes_exact, 0);
	cr_assert_eq(park_tenant_stats().bytes_meta, 0);
	park_close();
}

Test(fork_park, closing_the_running_sibling_releases_the_blocks_at_the_next_park)
{
	kvp_seq *a, *b, *c;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &c), KVP_OK);
	park_fill(a, 0, 100, 5);
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK);
	cr_assert_eq(kvp_seq_park(a), KVP_OK, "%s", kvp_last_error());
	kvp_seq_close(b); /* a's records keep the blocks b shared as twins */
	cr_assert_gt(park_tenant_stats().bytes_exact, 0);
	cr_assert_eq(kvp_seq_park(c), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(park_tenant_stats().bytes_exact, 0, "twins nobody runs on are released by a park");
	kvp_seq_close(a);
	kvp_seq_close(c);
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	park_close();
}

/* ---- steps while parked ---- */

static kvp_stats seq_stats(kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK, "%s", kvp_last_error());
	return st;
}

/*
 * A round that is due while the sequence is parked waits for the first step after it is back, and then
 * does what it does on a twin that was never parked. `primed`: one step before the park and a few tokens
 * after it, so the parked step has no round due and only walks the cold tier's candidates.
 */
static void a_step_while_parked_waits_for_unpark(const char *tenant_spec, int primed)
{
	static float a[PARK_LAYERS * PARK_OUT], b[PARK_LAYERS * PARK_OUT];
	kvp_stats held;
	kvp_seq *s, *ref;
	park_open("16MiB", tenant_spec);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &ref), KVP_OK, "%s", kvp_last_error());
	park_fill(s, 0, 150, 1);
	park_fill(ref, 0, 150, 1);
	park_attend(s, a); /* H2O and online TriAttention learn from attention */
	park_attend(ref, b);
	if (primed) {
		cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_seq_step(ref), KVP_OK, "%s", kvp_last_error());
		park_fill(s, 150, 20, 2);
		park_fill(ref, 150, 20, 2);
	}
	held = seq_stats(s);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_not_null(kvp_seq_from_handle(s)->parked, "a step does not bring the sequence back");
	cr_assert_eq(seq_stats(s).tokens_retained, held.tokens_retained, "no round ran while parked");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(ref), KVP_OK, "%s", kvp_last_error());
	if (primed) { /* no round: the step only walked the cold tier's candidates */
		cr_assert_gt(held.bytes_compressed, 0, "the sequence had a cold tier when it was parked");
		cr_assert_eq(seq_stats(ref).tokens_retained, held.tokens_retained, "no round was due");
	} else
		cr_assert_lt(seq_stats(ref).tokens_retained, held.tokens_retained, "a round was due");
	cr_assert_eq(seq_stats(s).tokens_retained, seq_stats(ref).tokens_retained, "the first step after unpark ran it");
	cr_assert_eq(seq_stats(s).bytes_compressed, seq_stats(ref).bytes_compressed);
	park_attend(s, a);
	park_attend(ref, b);
	cr_assert_eq(memcmp(a, b, sizeof a), 0, "as if it had never been parked");
	park_close();
}

Test(park, a_step_while_parked_waits_for_unpark_streaming)
{
	a_step_while_parked_waits_for_unpark("block=16,sinks=4,window=16,policy=streaming(sinks=4,window=40)", 0);
}

Test(park, a_step_while_parked_waits_for_unpark_h2o)
{
	a_step_while_parked_waits_for_unpark("block=16,sinks=4,window=16,policy=h2o(heavy=0.2,recent=0.2)", 0);
}

Test(park, a_step_while_parked_waits_for_unpark_triattention)
{
	a_step_while_parked_waits_for_unpark("block=16,sinks=4,window=16,"
					      "policy=triattention(budget=64,every=16,stats=online)", 0);
}

Test(park, a_step_while_parked_waits_for_unpark_with_a_cold_tier)
{
	a_step_while_parked_waits_for_unpark("block=16,sinks=4,window=16,k=turboquant(bits=4),v=turboquant(bits=4),"
					      "policy=streaming(sinks=4,window=40)", 0);
	a_step_while_parked_waits_for_unpark("block=32,sinks=4,window=32,k=kivi(bits=2),v=fp16,"
					      "policy=h2o(heavy=0.2,recent=0.2)", 0);
}

Test(park, a_step_while_parked_with_no_round_due_leaves_the_cold_tier_to_unpark)
{
	/* the first step scores and encodes; 20 more tokens stay under budget + every, so the parked step
	 * only looks for scored blocks to encode */
	a_step_while_parked_waits_for_unpark("block=16,sinks=4,window=16,k=turboquant(bits=4),v=turboquant(bits=4),"
					      "policy=triattention(budget=64,every=64,stats=online)", 1);
}

/* Positions stay in memory while a block's K and V are on the device: an H2O round packs survivors with
 * gaps into blocks that hold their positions (a bitmap or int32s), and after a park and an unpark every
 * stream reads back the positions of a twin that was never parked. */
Test(park, packed_positions_come_back_with_unpark)
{
	static int32_t a[1024], b[1024];
	uint32_t na, nb, packed = 0;
	kvp_seq *s, *ref;
	park_open("16MiB", "block=16,sinks=4,window=16,policy=h2o(heavy=0.2,recent=0.2)");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &ref), KVP_OK, "%s", kvp_last_error());
	for (kvp_seq *x = s; x; x = x == s ? ref : NULL) {
		static float out[PARK_LAYERS * PARK_OUT];
		park_fill(x, 0, 200, 1);
		park_attend(x, out);
		cr_assert_eq(kvp_seq_step(x), KVP_OK, "%s", kvp_last_error());
	}
	for (uint32_t i = 0; i < PARK_LAYERS * PARK_KV; i++) {
		const struct kvp_stream *st = &kvp_seq_from_handle(s)->streams[i];
		for (uint32_t j = 0; j < st->n_blocks; j++)
			packed += st->blocks[j]->positions != NULL;
	}
	cr_assert_gt(packed, 0, "the round packed survivors with gaps into blocks");
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	for (uint32_t l = 0; l < PARK_LAYERS; l++)
		for (uint32_t h = 0; h < PARK_KV; h++) {
			cr_assert_eq(kvp_gather(s, l, h, 1024, a, NULL, NULL, &na), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(kvp_gather(ref, l, h, 1024, b, NULL, NULL, &nb), KVP_OK, "%s", kvp_last_error());
			cr_assert_eq(na, nb);
			cr_assert_lt(na, 200, "the round dropped tokens");
			cr_assert_eq(memcmp(a, b, na * sizeof *a), 0, "layer %u, KV head %u: positions after unpark", l, h);
		}
	kvp_seq_close(s);
	kvp_seq_close(ref);
	park_close();
}
