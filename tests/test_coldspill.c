/*
 * Cold blocks of an active sequence on the spill device: pressure with no idle sequence left spills the
 * caller's oldest cold blocks, attention brings them back (prefetching the next layer's) bit-identical
 * to a run that kept everything in memory, and failed restores leave the sequence usable.
 * The in-memory run is a second tenant of the same pool without a quota, fed the same tokens.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"
#include "spill_fixture.h"

TestSuite(coldspill, .fini = spill_fixture_fini);

#define LAYERS 4
#define HEADS 4
#define KV 2
#define DIM 32
#define ROW (KV * DIM)
#define OUT (HEADS * DIM)
#define TOKENS 400
#define CHUNK 8
#define COLD "block=16,sinks=4,window=32,k=turboquant(bits=4),v=fp16"

static const kvp_shape shape = { LAYERS, HEADS, KV, DIM, 10000.0f, KVP_ROPE_HALF };
static kvp_pool *pool;
static kvp_tenant *ref_tenant, *tenant;
static kvp_seq *ref, *seq;

/* Appends tokens [first, first+n) to every layer in chunks, the same values for any sequence. */
static kvp_status fill(kvp_seq *s, int32_t first, uint32_t n)
{
	static float k[CHUNK * ROW], v[CHUNK * ROW];
	int32_t pos[CHUNK];
	for (uint32_t at = 0; at < n; at += CHUNK)
		for (uint32_t l = 0; l < LAYERS; l++) {
			uint32_t m = n - at < CHUNK ? n - at : CHUNK;
			kvp_status st;
			for (uint32_t i = 0; i < m; i++)
				pos[i] = first + (int32_t)(at + i);
			fixture_fill(k, (size_t)m * ROW, 1000u * l + (uint64_t)first + at, 2);
			fixture_fill(v, (size_t)m * ROW, 5000u * l + (uint64_t)first + at + 7, 2);
			if ((st = kvp_append(s, l, m, pos, k, v)) != KVP_OK)
				return st;
		}
	return KVP_OK;
}

static uint64_t tenant_bytes(kvp_tenant *t)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK);
	return st.bytes_exact + st.bytes_compressed + st.bytes_meta;
}

/* A pool with the reference tenant filled, and a tenant whose quota is `percent` of what that took. */
static void open_pair(unsigned percent)
{
	char spec[600];
	spill_fixture_open("64MiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "ref", COLD, &ref_tenant), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(ref_tenant, &shape, &ref), KVP_OK);
	cr_assert_eq(fill(ref, 0, TOKENS), KVP_OK, "%s", kvp_last_error());
	snprintf(spec, sizeof spec, COLD ",quota=%llu", (unsigned long long)(tenant_bytes(ref_tenant) * percent / 100));
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &tenant), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &shape, &seq), KVP_OK);
	cr_assert_eq(fill(seq, 0, TOKENS), KVP_OK, "cold blocks make room: %s", kvp_last_error());
}

static void close_pair(void)
{
	kvp_stats st = { .size = sizeof st };
	kvp_seq_close(seq);
	kvp_seq_close(ref);
	cr_assert_eq(kvp_tenant_stats(tenant, &st), KVP_OK);
	cr_assert_eq(st.bytes_exact + st.bytes_compressed + st.bytes_meta + st.bytes_spilled, 0, "nothing leaked");
	cr_assert_eq(kvp_spill_pages_used(pool), 0, "every slot is free");
	kvp_pool_close(pool);
	cr_assert_eq(spill_fixture_close(), 0);
}

static void attend_layer(kvp_seq *s, uint32_t l, float *out)
{
	float q[OUT];
	fixture_fill(q, OUT, 77 + l, 1);
	cr_assert_eq(kvp_attend(s, l, q, out), KVP_OK, "layer %u: %s", l, kvp_last_error());
}

static void assert_same_attention(void)
{
	float a[OUT], b[OUT];
	for (uint32_t l = 0; l < LAYERS; l++) {
		attend_layer(ref, l, a);
		attend_layer(seq, l, b);
		cr_assert_eq(memcmp(a, b, sizeof a), 0, "layer %u is bit-identical to the in-memory run", l);
	}
}

static uint32_t spilled_in_layer(const struct kvp_seq_obj *s, uint32_t l)
{
	uint32_t n = 0;
	for (uint32_t g = 0; g < KV; g++) {
		const struct kvp_stream *st = kvp_seq_stream(s, l, g);
		for (uint32_t b = 0; b < st->n_cold; b++)
			n += st->blocks[b]->spilled != NULL;
	}
	return n;
}

Test(coldspill, pressure_spills_the_active_sequences_cold_blocks_and_attention_stays_bit_identical)
{
	struct kvp_seq_obj *s;
	kvp_stats st = { .size = sizeof st };
	open_pair(85);
	s = kvp_seq_from_handle(seq);
	cr_assert_gt(s->n_spilled, 0, "no idle sequence to park: the caller's own cold blocks went");
	cr_assert_eq(kvp_seq_stats(seq, &st), KVP_OK);
	cr_assert_gt(st.bytes_spilled, 0);
	cr_assert_null(s->parked, "the sequence itself stays active");
	for (int step = 0; step < 3; step++) /* restores make room by spilling other layers: round and round */
		assert_same_attention();
	cr_assert_eq(fill(seq, TOKENS, 40), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(fill(ref, TOKENS, 40), KVP_OK, "%s", kvp_last_error());
	assert_same_attention();
	close_pair();
}

static uint32_t exact_spilled(const struct kvp_seq_obj *s)
{
	uint32_t n = 0;
	for (uint32_t l = 0; l < LAYERS; l++)
		for (uint32_t g = 0; g < KV; g++) {
			const struct kvp_stream *st = kvp_seq_stream(s, l, g);
			for (uint32_t b = 0; b < st->n_blocks; b++)
				n += st->blocks[b]->spilled && st->blocks[b]->store != KVP_STORE_CODEC;
		}
	return n;
}

Test(coldspill, an_idle_sequences_spilled_exact_blocks_come_back_for_the_append_that_encodes_them)
{
	struct kvp_seq_obj *s;
	open_pair(200);
	s = kvp_seq_from_handle(seq);
	/* what pressure does to an idle sequence, all at once: cold and exact blocks but the tails go */
	cr_assert_gt(kvp_spill_blocks(s, UINT64_MAX, KVP_SPILL_IDLE, NULL), 0);
	cr_assert_gt(exact_spilled(s), 0, "exact blocks older than the tails went too");
	cr_assert_eq(fill(seq, TOKENS, 40), KVP_OK, "%s", kvp_last_error()); /* turns them cold */
	cr_assert_eq(fill(ref, TOKENS, 40), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(exact_spilled(s), 0, "each append read its layer's back before encoding them");
	cr_assert_gt(s->n_spilled, 0, "the cold ones stay on the device until attention needs them");
	assert_same_attention();
	cr_assert_eq(s->n_spilled, 0);
	close_pair();
}

Test(coldspill, a_tenant_without_a_quota_problem_never_spills)
{
	open_pair(200);
	cr_assert_eq(kvp_seq_from_handle(seq)->n_spilled, 0);
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	close_pair();
}

Test(coldspill, attending_layer_l_starts_reading_layer_l_plus_1s_spilled_blocks)
{
	struct kvp_seq_obj *s;
	float out[OUT];
	open_pair(85);
	s = kvp_seq_from_handle(seq);
	cr_assert_gt(spilled_in_layer(s, 2), 0, "layer 2 has blocks on the device");
	s->tenant->quota = UINT64_MAX; /* room for everything: the prefetch is not cut short */
	attend_layer(seq, 1, out);
	cr_assert_eq(spilled_in_layer(s, 1), 0, "the attended layer is resident");
	cr_assert_not_null(s->restore, "reads of the next layer are in flight");
	for (uint32_t g = 0; g < KV; g++) {
		const struct kvp_stream *st = kvp_seq_stream(s, 2, g);
		for (uint32_t b = 0; b < st->n_cold; b++)
			cr_assert(!st->blocks[b]->spilled || st->blocks[b]->k, "block %u of layer 2 is being read", b);
	}
	attend_layer(seq, 2, out);
	cr_assert_eq(spilled_in_layer(s, 2), 0, "the prefetched blocks were filed");
	assert_same_attention();
	close_pair();
}

Test(coldspill, a_failed_restore_read_returns_eio_keeps_the_record_and_the_next_attend_works)
{
	struct kvp_seq_obj *s;
	float q[OUT] = { 0 }, out[OUT];
	uint32_t before;
	open_pair(85);
	s = kvp_seq_from_handle(seq);
	before = spilled_in_layer(s, 0);
	cr_assert_gt(before, 0);
	kvp_spill_inject(pool, &(struct kvp_spill_faults){ .fail_read = 1 });
	cr_assert_eq(kvp_attend(seq, 0, q, out), KVP_EIO);
	cr_assert(strstr(kvp_last_error(), "read of"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "stay on the device"), "%s", kvp_last_error());
	cr_assert_eq(spilled_in_layer(s, 0), 1, "the one failed read left its block spilled");
	assert_same_attention();
	close_pair();
}

Test(coldspill, a_corrupt_record_returns_ecorrupt_every_time_and_closing_gives_everything_back)
{
	struct kvp_seq_obj *s;
	const struct kvp_stream *st;
	float q[OUT] = { 0 }, out[OUT];
	unsigned char junk = 0xa5;
	int fd;
	open_pair(85);
	s = kvp_seq_from_handle(seq);
	st = kvp_seq_stream(s, 0, 1);
	cr_assert_not_null(st->blocks[0]->spilled, "the oldest block went first");
	fd = open(spill_path, O_WRONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite(fd, &junk, 1, (off_t)(st->blocks[0]->spilled->first_page * 4096 + 64 + 100)), 1);
	close(fd);
	cr_assert_eq(kvp_attend(seq, 0, q, out), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "fails its checksum"), "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(seq, 0, q, out), KVP_ECORRUPT, "never garbage, however often it is asked");
	cr_assert_not_null(st->blocks[0]->spilled);
	attend_layer(seq, 1, out); /* the other layers still serve */
	close_pair();
}

Test(coldspill, parking_a_sequence_with_spilled_blocks_and_unparking_it_is_bit_identical)
{
	open_pair(85);
	cr_assert_gt(kvp_seq_from_handle(seq)->n_spilled, 0);
	cr_assert_eq(kvp_seq_park(seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_from_handle(seq)->n_spilled, 0);
	kvp_seq_from_handle(seq)->tenant->quota = UINT64_MAX;
	cr_assert_eq(kvp_seq_unpark(seq), KVP_OK, "%s", kvp_last_error());
	assert_same_attention();
	close_pair();
}

Test(coldspill, a_fork_brings_the_spilled_blocks_back_before_sharing_them)
{
	kvp_seq *child;
	float a[OUT], b[OUT];
	open_pair(85);
	kvp_seq_from_handle(seq)->tenant->quota = UINT64_MAX;
	cr_assert_eq(kvp_seq_fork(seq, &child), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_from_handle(seq)->n_spilled, 0);
	for (uint32_t l = 0; l < LAYERS; l++) {
		attend_layer(ref, l, a);
		attend_layer(child, l, b);
		cr_assert_eq(memcmp(a, b, sizeof a), 0);
	}
	kvp_seq_close(child);
	close_pair();
}
