/* Memory pressure: a charge over the tenant's quota or the pool's limit first spills blocks of the
 * tenant's least recently used idle sequence, only as many as it is short of, oldest first; then parks
 * an idle sequence with nothing left to spill alone. Such a sequence comes back by itself, block by block
 * or whole, on its next call, bit-identical. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "park_fixture.h"

TestSuite(pressure, .fini = spill_fixture_fini);

static uint64_t spilled(kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK);
	return st.bytes_spilled;
}

/* Three sequences of 100 tokens (~110 KB each) under a 400 KiB quota; b is the least recently used. */
static void three_sequences(kvp_seq **a, kvp_seq **b, kvp_seq **c, float *b_before)
{
	float out[PARK_LAYERS * PARK_OUT];
	park_open("16MiB", "block=16,sinks=4,quota=400KiB");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, a), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, b), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, c), KVP_OK);
	park_fill(*a, 0, 100, 1);
	park_fill(*b, 0, 100, 2);
	park_fill(*c, 0, 100, 3);
	park_attend(*b, b_before);
	park_attend(*a, out);
	park_attend(*c, out);
}

Test(pressure, an_append_over_quota_spills_blocks_of_the_least_recently_used_idle_sequence)
{
	float before[PARK_LAYERS * PARK_OUT];
	kvp_seq *a, *b, *c;
	three_sequences(&a, &b, &c, before);
	cr_assert_eq(park_tenant_stats().bytes_spilled, 0);
	park_fill(c, 100, 100, 4); /* would pass the quota by ~40 KB */
	cr_assert_gt(spilled(b), 0, "b was the least recently used");
	cr_assert_null(kvp_seq_from_handle(b)->parked, "b lost some blocks, and stays resident");
	cr_assert_eq(spilled(a), 0);
	cr_assert_eq(spilled(c), 0);
	cr_assert_eq(park_tenant_stats().bytes_spilled, spilled(b));
	park_close();
}

static uint64_t tenant_used(void)
{
	kvp_stats st = park_tenant_stats();
	return st.bytes_exact + st.bytes_compressed + st.bytes_meta;
}

/* n tokens at positions first.. to layer 0 only: one call, so one charge sequence. */
static kvp_status append_layer0(kvp_seq *s, int32_t first, uint32_t n)
{
	static float k[400 * PARK_ROW], v[400 * PARK_ROW];
	int32_t pos[400];
	cr_assert_leq(n, 400);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = first + (int32_t)i;
	fixture_fill(k, (size_t)n * PARK_ROW, 77, 2);
	fixture_fill(v, (size_t)n * PARK_ROW, 78, 2);
	return kvp_append(s, 0, n, pos, k, v);
}

static void assert_everything_given_back(void)
{
	kvp_stats st = park_tenant_stats();
	cr_assert_eq(st.bytes_exact + st.bytes_compressed + st.bytes_meta, 0, "no byte is left charged");
	cr_assert_eq(st.bytes_spilled, 0);
	cr_assert_eq(kvp_spill_pages_used(pool), 0, "every slot is free");
}

/* An exact fp32 block of 16 tokens x 32 dims: 4 KiB of rows, a 2-page record. */
#define BLOCK_RECORD (2 * 4096)

Test(pressure, an_append_spills_only_as_many_idle_blocks_as_it_is_short_of)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *idle, *twin, *s;
	uint64_t used, delta, net, k;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1); /* per stream 4 sinks and 6 blocks: 5 can go alone, 20 in all */
	park_attend(idle, before);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &twin), KVP_OK);
	park_fill(s, 0, 40, 2);
	park_fill(twin, 0, 40, 2);
	/* what the append takes, measured on a twin in the same state */
	used = tenant_used();
	cr_assert_eq(append_layer0(twin, 40, 64), KVP_OK, "%s", kvp_last_error());
	delta = tenant_used() - used;
	kvp_seq_close(twin);
	kvp_tenant_from_handle(tenant)->quota = tenant_used(); /* full: the append is short of exactly delta */
	net = kvp_alloc_size(kvp_tenant_from_handle(tenant), 4096) -
	      kvp_alloc_size(kvp_tenant_from_handle(tenant), sizeof(struct kvp_spilled));
	k = (delta + net - 1) / net;
	cr_log_info("the append is short of %llu bytes: %llu blocks", (unsigned long long)delta, (unsigned long long)k);
	cr_assert(k >= 2 && k < 20, "the append needs %llu of the idle sequence's 20 blocks", (unsigned long long)k);
	cr_assert_eq(append_layer0(s, 40, 64), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(spilled(idle), k * BLOCK_RECORD, "%llu bytes spilled, %llu blocks' worth needed",
		     (unsigned long long)spilled(idle), (unsigned long long)k);
	cr_assert_eq(kvp_seq_from_handle(idle)->n_spilled, k);
	cr_assert_null(kvp_seq_from_handle(idle)->parked, "the idle sequence stays resident");
	cr_assert_eq(spilled(s), 0);
	kvp_tenant_from_handle(tenant)->quota = UINT64_MAX;
	park_attend(idle, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "the idle sequence attends bit-identically");
	cr_assert_eq(spilled(idle), 0, "attention brought every spilled block back");
	kvp_seq_close(idle);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(pressure, the_oldest_blocks_of_an_idle_sequence_go_first_and_its_sinks_and_tails_stay)
{
	kvp_seq *idle;
	struct kvp_seq_obj *in;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1);
	in = kvp_seq_from_handle(idle);
	cr_assert_eq(kvp_spill_blocks(in, 1, KVP_SPILL_IDLE, NULL), 1, "one block covers one byte");
	cr_assert_not_null(kvp_seq_stream(in, 0, 0)->blocks[0]->spilled, "block 0 of the first stream went");
	cr_assert_eq(kvp_spill_blocks(in, UINT64_MAX, KVP_SPILL_IDLE, NULL), 19, "then every block that can go alone");
	for (uint32_t l = 0; l < PARK_LAYERS; l++)
		for (uint32_t g = 0; g < PARK_KV; g++) {
			const struct kvp_stream *st = kvp_seq_stream(in, l, g);
			cr_assert_null(st->sink->spilled);
			cr_assert_null(st->blocks[st->n_blocks - 1]->spilled, "the tail takes the next append");
		}
	park_fill(idle, 100, 20, 5); /* appends into the resident tail and new blocks */
	kvp_seq_close(idle);
	assert_everything_given_back();
	park_close();
}

Test(pressure, an_idle_sequence_with_no_block_left_to_spill_alone_is_parked_whole)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *idle, *s;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1);
	park_attend(idle, before);
	cr_assert_eq(kvp_spill_blocks(kvp_seq_from_handle(idle), UINT64_MAX, KVP_SPILL_IDLE, NULL), 20);
	kvp_tenant_from_handle(tenant)->quota = tenant_used();
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert_not_null(kvp_seq_from_handle(idle)->parked, "its sinks and tails went with the rest");
	cr_assert(kvp_seq_from_handle(idle)->pressure_parked);
	kvp_tenant_from_handle(tenant)->quota = UINT64_MAX;
	park_attend(idle, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "unparked on its next call, bit-identical");
	kvp_seq_close(idle);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(pressure, an_append_that_does_not_fit_after_spilling_fails_whole_and_says_what_was_spilled)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *idle, *s;
	uint32_t n;
	park_open("16MiB", "block=16,sinks=4,quota=256KiB");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1);
	park_attend(idle, before);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 2);
	cr_assert_eq(append_layer0(s, 100, 400), KVP_ENOMEM, "400 tokens take ~210 KB, more than idle can give");
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "spilled 20 blocks of idle sequences"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "parked 1 idle"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "come back when used"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gather(s, 0, 0, 0, NULL, NULL, NULL, &n), KVP_EINVAL);
	cr_assert_eq(n, 100, "nothing was appended");
	cr_assert_eq(spilled(s), 0);
	cr_assert_gt(spilled(idle), 0, "what was spilled stays on the device");
	park_attend(idle, after); /* back within the quota: s's blocks make room */
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "and nothing of it was lost");
	kvp_seq_close(idle);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(pressure, a_sequence_pressure_spilled_from_comes_back_on_its_next_call_bit_identical)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *a, *b, *c;
	three_sequences(&a, &b, &c, before);
	park_fill(c, 100, 100, 4);
	cr_assert_gt(spilled(b), 0);
	park_attend(b, after); /* brings b's blocks back, spilling the now least recently used a's to make room */
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	cr_assert_eq(spilled(b), 0);
	cr_assert_gt(spilled(a), 0, "a was idle longest when b came back");
	cr_assert_eq(spilled(c), 0);
	park_fill(b, 100, 1, 5); /* appends work on it too */
	park_close();
}

Test(pressure, the_host_parking_a_sequence_pressure_spilled_from_makes_it_stay_parked)
{
	float before[PARK_LAYERS * PARK_OUT], out[PARK_OUT];
	kvp_seq *a, *b, *c;
	three_sequences(&a, &b, &c, before);
	park_fill(c, 100, 100, 4);
	cr_assert_eq(kvp_seq_park(b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(b, 0, before, out), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "parked"), "%s", kvp_last_error());
	park_close();
}

Test(pressure, only_the_appending_sequence_left_means_enomem_and_nothing_changes)
{
	float k[200 * PARK_ROW] = { 0 };
	int32_t pos[200];
	uint32_t n;
	kvp_seq *s;
	park_open("16MiB", "block=16,sinks=4,quota=128KiB");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 1);
	for (int i = 0; i < 200; i++)
		pos[i] = 100 + i;
	cr_assert_eq(kvp_append(s, 0, 200, pos, k, k), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert_eq(kvp_gather(s, 0, 0, 0, NULL, NULL, NULL, &n), KVP_EINVAL);
	cr_assert_eq(n, 100, "nothing was appended");
	cr_assert_eq(park_tenant_stats().bytes_spilled, 0, "the caller itself is never the victim");
	park_close();
}

Test(pressure, never_parks_another_tenants_sequences)
{
	kvp_tenant *other;
	kvp_seq *mine, *theirs;
	static float k[300 * PARK_ROW];
	int32_t pos[300];
	kvp_stats st = { .size = sizeof st };
	spill_fixture_open("16MiB", ",mem=400KiB");
	cr_assert_eq(kvp_pool_open(spill_spec, &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", "block=16", &tenant), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "other", "block=16", &other), KVP_OK);
	cr_assert_eq(kvp_seq_open(other, &park_shape, &theirs), KVP_OK);
	park_fill(theirs, 0, 150, 1); /* idle, and half the pool */
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &mine), KVP_OK);
	park_fill(mine, 0, 100, 2);
	for (int i = 0; i < 300; i++)
		pos[i] = 100 + i;
	cr_assert_eq(kvp_append(mine, 0, 300, pos, k, k), KVP_ENOMEM, "the pool is full");
	cr_assert(strstr(kvp_last_error(), "pool"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_stats(other, &st), KVP_OK);
	cr_assert_eq(st.bytes_spilled, 0, "the other tenant's idle sequence was left alone");
	park_close();
}

Test(pressure, without_a_spill_device_over_quota_is_plain_enomem)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *a, *b;
	static float k[100 * PARK_ROW];
	int32_t pos[100];
	for (int i = 0; i < 100; i++)
		pos[i] = i;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "t", "quota=128KiB", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &park_shape, &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &park_shape, &b), KVP_OK);
	cr_assert_eq(kvp_append(a, 0, 100, pos, k, k), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_append(b, 0, 100, pos, k, k), KVP_ENOMEM, "a is idle, but there is nowhere to put it");
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	kvp_pool_close(p);
}

/* ---- steps on sequences pressure spilled from ---- */

#define POLICY_SPEC "block=16,sinks=4,window=16,policy=streaming(sinks=4,window=40)"
#define COLD_POLICY_SPEC "block=16,sinks=4,window=16,k=turboquant(bits=4),v=turboquant(bits=4)," \
	"policy=streaming(sinks=4,window=40)"

/* A twin of every sequence under test lives in a tenant of its own, where no pressure reaches it. */
static kvp_seq *twin_open(const char *spec)
{
	kvp_tenant *other;
	kvp_seq *s;
	cr_assert_eq(kvp_tenant_open(pool, "twin", spec, &other), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(other, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	return s;
}

static uint64_t retained(kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_seq_stats(s, &st), KVP_OK);
	return st.tokens_retained;
}

/* The same tokens, attention and steps give bit for bit the same attention. */
static void assert_same_attention(kvp_seq *s, kvp_seq *twin)
{
	float a[PARK_LAYERS * PARK_OUT], b[PARK_LAYERS * PARK_OUT];
	park_attend(s, a);
	park_attend(twin, b);
	cr_assert_eq(retained(s), retained(twin));
	cr_assert_eq(memcmp(a, b, sizeof a), 0, "as if pressure had never touched it");
}

Test(pressure, a_step_on_a_sequence_pressure_parked_leaves_its_round_to_its_return)
{
	float out[PARK_LAYERS * PARK_OUT];
	kvp_seq *idle, *s, *twin;
	uint64_t held;
	park_open("16MiB", POLICY_SPEC);
	twin = twin_open(POLICY_SPEC);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1);
	park_fill(twin, 0, 100, 1);
	park_attend(idle, out);
	park_attend(twin, out);
	held = retained(idle);
	cr_assert_eq(kvp_spill_blocks(kvp_seq_from_handle(idle), UINT64_MAX, KVP_SPILL_IDLE, NULL), 20);
	kvp_tenant_from_handle(tenant)->quota = tenant_used();
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	cr_assert(kvp_seq_from_handle(idle)->pressure_parked, "pressure parked it");
	kvp_tenant_from_handle(tenant)->quota = UINT64_MAX;
	cr_assert_eq(kvp_seq_step(idle), KVP_OK, "%s", kvp_last_error());
	cr_assert_not_null(kvp_seq_from_handle(idle)->parked, "a step does not bring it back");
	cr_assert_eq(retained(idle), held, "its round waits");
	park_attend(idle, out); /* brings it back */
	cr_assert_null(kvp_seq_from_handle(idle)->parked);
	cr_assert_eq(kvp_seq_step(idle), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(twin), KVP_OK, "%s", kvp_last_error());
	cr_assert_lt(retained(twin), held, "a round was due");
	assert_same_attention(idle, twin);
	park_close();
}

Test(pressure, a_step_brings_back_the_blocks_pressure_spilled_before_its_round)
{
	float out[PARK_LAYERS * PARK_OUT];
	kvp_seq *idle, *twin;
	uint64_t held;
	park_open("16MiB", COLD_POLICY_SPEC);
	twin = twin_open(COLD_POLICY_SPEC);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	for (int32_t t = 0; t < 120; t += 30) { /* rounds, and cold blocks of the tokens they scored */
		park_fill(idle, t, 30, 1 + (uint64_t)t);
		park_fill(twin, t, 30, 1 + (uint64_t)t);
		park_attend(idle, out);
		park_attend(twin, out);
		cr_assert_eq(kvp_seq_step(idle), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_seq_step(twin), KVP_OK, "%s", kvp_last_error());
	}
	park_fill(idle, 120, 20, 9);
	park_fill(twin, 120, 20, 9);
	held = retained(idle);
	cr_assert_gt(kvp_spill_blocks(kvp_seq_from_handle(idle), UINT64_MAX, KVP_SPILL_IDLE, NULL), 0);
	cr_assert_eq(kvp_seq_step(idle), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_from_handle(idle)->n_spilled, 0, "the round read every block back first");
	cr_assert_eq(kvp_seq_step(twin), KVP_OK, "%s", kvp_last_error());
	cr_assert_lt(retained(twin), held, "a round was due");
	assert_same_attention(idle, twin);
	park_close();
}

Test(pressure, a_rounds_own_allocations_never_spill_the_blocks_it_reads)
{
	float out[PARK_LAYERS * PARK_OUT];
	kvp_seq *s, *twin;
	park_open("16MiB", COLD_POLICY_SPEC);
	twin = twin_open(COLD_POLICY_SPEC);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 1);
	park_fill(twin, 0, 100, 1);
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(twin), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(kvp_seq_stream(kvp_seq_from_handle(s), 0, 0)->n_cold, 0, "the round's tokens turned cold");
	park_fill(s, 100, 1, 2); /* the next round drops one token of the oldest cold block: packs the rest */
	park_fill(twin, 100, 1, 2);
	/* its fresh block is over quota, and s is the tenant's only sequence */
	kvp_tenant_from_handle(tenant)->quota = tenant_used();
	cr_assert_eq(kvp_seq_step(s), KVP_ENOMEM, "the round fails whole rather than spill what it reads");
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_from_handle(s)->n_spilled, 0);
	kvp_tenant_from_handle(tenant)->quota = UINT64_MAX;
	cr_assert_eq(kvp_seq_step(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_step(twin), KVP_OK, "%s", kvp_last_error());
	park_attend(s, out);
	assert_same_attention(s, twin);
	park_close();
}

/* ---- the quota holds the spill's own metadata too ---- */

struct used_watch {
	struct kvp_tenant_obj *t;
	_Atomic int stop;
	uint64_t most; /* the highest charge seen */
};

static void *watch_used(void *arg)
{
	struct used_watch *w = arg;
	while (!atomic_load(&w->stop)) {
		uint64_t used = atomic_load(&w->t->used);
		w->most = used > w->most ? used : w->most;
	}
	return NULL;
}

Test(pressure, relief_never_charges_past_the_quota_while_it_writes)
{
	float before[PARK_LAYERS * PARK_OUT];
	struct used_watch w = { 0 };
	pthread_t th;
	kvp_seq *a, *b, *c;
	int32_t t = 100;
	uint32_t relieved = 0;
	three_sequences(&a, &b, &c, before);
	w.t = kvp_tenant_from_handle(tenant);
	cr_assert_eq(pthread_create(&th, NULL, watch_used, &w), 0);
	/* every append over the quota writes the stubs of the idle blocks it spills, then frees their rows */
	while (t < 1000 && append_layer0(c, t, 16) == KVP_OK) {
		relieved += spilled(a) + spilled(b) > 0;
		t += 16;
	}
	atomic_store(&w.stop, 1);
	pthread_join(th, NULL);
	cr_assert_gt(relieved, 5, "appends went on by spilling idle blocks");
	cr_assert_leq(w.most, w.t->quota, "%llu bytes charged, over the quota of %llu", (unsigned long long)w.most,
		      (unsigned long long)w.t->quota);
	park_close();
}

Test(pressure, parking_a_sequence_whose_blocks_a_running_fork_shares_stays_within_the_quota)
{
	struct kvp_tenant_obj *owner;
	kvp_seq *a, *b;
	park_open("16MiB", "block=16,sinks=4");
	owner = kvp_tenant_from_handle(tenant);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	park_fill(a, 0, 100, 1);
	cr_assert_eq(kvp_seq_fork(a, &b), KVP_OK, "%s", kvp_last_error());
	owner->quota = atomic_load(&owner->used); /* full: b's append must make room */
	/* a is idle, but every block it has b shares: parking it would free nothing and cost its records */
	cr_assert_eq(append_layer0(b, 100, 64), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert_leq(atomic_load(&owner->used), owner->quota,
		      "%llu bytes charged, over the quota of %llu", (unsigned long long)atomic_load(&owner->used),
		      (unsigned long long)owner->quota);
	cr_assert_null(kvp_seq_from_handle(a)->parked, "a park the quota has no room for fails whole");
	owner->quota = UINT64_MAX;
	kvp_seq_close(a);
	kvp_seq_close(b);
	assert_everything_given_back();
	park_close();
}

Test(pressure, gather_and_stats_on_a_sequence_pressure_spilled_from_read_no_spilled_row)
{
	static float k0[100 * PARK_DIM], v0[100 * PARK_DIM], k1[100 * PARK_DIM], v1[100 * PARK_DIM];
	int32_t p0[100], p1[100];
	kvp_stats st = { .size = sizeof st };
	uint32_t n0, n1;
	kvp_seq *idle;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &idle), KVP_OK);
	park_fill(idle, 0, 100, 1);
	cr_assert_eq(kvp_gather(idle, 1, 1, 100, p0, k0, v0, &n0), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_blocks(kvp_seq_from_handle(idle), UINT64_MAX, KVP_SPILL_IDLE, NULL), 20);
	cr_assert_eq(kvp_seq_stats(idle, &st), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(st.bytes_spilled, 20 * BLOCK_RECORD, "stats count the records, not the freed rows");
	cr_assert_eq(st.tokens_retained, 4 * 100);
	cr_assert_eq(kvp_gather(idle, 1, 1, 100, p1, k1, v1, &n1), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(n1, n0);
	cr_assert_eq(memcmp(p0, p1, sizeof p0), 0);
	cr_assert_eq(memcmp(k0, k1, sizeof k0), 0, "the gathered layer was read back first");
	cr_assert_eq(memcmp(v0, v1, sizeof v0), 0);
	cr_assert_eq(kvp_seq_from_handle(idle)->n_spilled, 10, "only the gathered layer came back");
	kvp_seq_close(idle);
	assert_everything_given_back();
	park_close();
}
