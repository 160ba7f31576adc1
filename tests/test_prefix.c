/*
 * Prefix caching (kvp_seq_open_prefix): what a second sequence of the same prompt finds, that its
 * attention is the same as appending it, isolation between tenants, and what memory pressure frees.
 *
 * The K and V of a token are a deterministic function of (token id, position, layer, head), as a
 * model's are of the prefix: two sequences given the same prompt append the same rows.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kvpager.h"
#include "model_fixture.h"
#include "pager/pager.h"
#include "pager_fixture.h"
#include "prefix_fixture.h"
#include "spill_fixture.h"

TestSuite(prefix, .fini = spill_fixture_fini);

/* ---- configuration ---- */

Test(prefix, model_names_are_checked_and_named)
{
	static const char *bad[] = { "model=", "model=a b", "model=x=y", "model=(x)", "model=tab\tx",
				     "model=0123456789012345678901234567890123456789012345678901234567890123" };
	kvp_tenant *t;
	pool_open("");
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		cr_assert_eq(kvp_tenant_open(pool, "t", bad[i], &t), KVP_EINVAL, "%s", bad[i]);
		cr_assert(strstr(kvp_last_error(), "model="), "%s: %s", bad[i], kvp_last_error());
	}
	cr_assert_eq(kvp_tenant_open(pool, "t", "model=llama-3.1-8b@rev:2", &t), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
}

Test(prefix, prefix_on_needs_a_model)
{
	kvp_tenant *t;
	pool_open("");
	cr_assert_eq(kvp_tenant_open(pool, "t", "prefix=on", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "prefix=on needs model="), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", "prefix=maybe,model=m", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "prefix=maybe"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", "prefix=off", &t), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
}

Test(prefix, share_prefix_takes_zero_or_one)
{
	cr_assert_eq(kvp_pool_open("share_prefix=2", &pool), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "share_prefix"), "%s", kvp_last_error());
	pool_open("share_prefix=1");
	kvp_pool_close(pool);
	pool_open("share_prefix=0");
	kvp_pool_close(pool);
}

/* ---- lookups ---- */

Test(prefix, second_sequence_finds_the_whole_units_of_the_prompt)
{
	int32_t tokens[33];
	uint32_t cached = 99;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=16");
	prompt_fill(tokens, 33, 1);
	kvp_seq *a = open_prompt(t, tokens, 33, &cached);
	cr_assert_eq(cached, 0);
	append_tokens(a, tokens, 0, 33);
	kvp_seq *b = open_prompt(t, tokens, 33, &cached);
	cr_assert_eq(cached, 4 + 3 * 8, "the sink and three blocks; the fifth unit is not whole");
	kvp_stats sb = seq_stats(b), st = tenant_stats(t);
	cr_assert_eq(sb.prefix_hit_tokens, 28);
	cr_assert_eq(sb.prefix_miss_tokens, 0);
	cr_assert_eq(sb.tokens_retained, 28ull * L * NKV, "the installed tokens are the sequence's");
	cr_assert_eq(st.prefix_hit_tokens, 28);
	cr_assert_eq(st.prefix_miss_tokens, 28, "the first lookup missed the four units it looked up");
	kvp_pool_close(pool);
}

Test(prefix, the_prompts_last_token_is_left_for_the_host)
{
	int32_t tokens[20];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=16");
	prompt_fill(tokens, 20, 3);
	run_prompt(t, tokens, 20); /* exactly three units */
	open_prompt(t, tokens, 20, &cached);
	cr_assert_eq(cached, 12, "the last unit holds the last token: the host computes it (%u)", cached);
	kvp_pool_close(pool);
}

Test(prefix, a_different_token_ends_the_hit_at_its_unit)
{
	int32_t tokens[40], other[40];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=16");
	prompt_fill(tokens, 40, 5);
	run_prompt(t, tokens, 40);
	memcpy(other, tokens, sizeof other);
	other[4 + 8 + 3] += 1; /* in the third unit */
	kvp_seq *b = open_prompt(t, other, 40, &cached);
	cr_assert_eq(cached, 12);
	cr_assert_eq(seq_stats(b).prefix_miss_tokens, 24, "three looked-up units missed");
	other[0] += 1;
	open_prompt(t, other, 40, &cached);
	cr_assert_eq(cached, 0, "a different first token: nothing matches");
	kvp_pool_close(pool);
}

Test(prefix, units_register_once_every_layer_holds_them)
{
	int32_t tokens[30];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=16");
	prompt_fill(tokens, 30, 7);
	kvp_seq *a = open_prompt(t, tokens, 30, &cached);
	cr_assert_eq(append_layers(a, tokens, 0, 30, 0, 1), KVP_OK);
	kvp_seq_close(open_prompt(t, tokens, 30, &cached));
	cr_assert_eq(cached, 0, "layer 1 holds nothing yet");
	cr_assert_eq(append_layers(a, tokens, 0, 13, 1, 2), KVP_OK);
	kvp_seq_close(open_prompt(t, tokens, 30, &cached));
	cr_assert_eq(cached, 12, "the sink and the first block are in both layers");
	cr_assert_eq(append_layers(a, tokens, 13, 30, 1, 2), KVP_OK);
	kvp_seq_close(open_prompt(t, tokens, 30, &cached));
	cr_assert_eq(cached, 28);
	kvp_pool_close(pool);
}

Test(prefix, tenant_without_prefix_opens_a_plain_sequence)
{
	int32_t tokens[30];
	uint32_t cached = 7;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,prefix=off,block=8,sinks=4");
	prompt_fill(tokens, 30, 9);
	run_prompt(t, tokens, 30);
	kvp_seq *b = open_prompt(t, tokens, 30, &cached);
	cr_assert_eq(cached, 0);
	cr_assert_eq(seq_stats(b).tokens_retained, 0);
	kvp_stats st = tenant_stats(t);
	cr_assert_eq(st.prefix_hit_tokens + st.prefix_miss_tokens + st.bytes_cached, 0);
	kvp_pool_close(pool);
}

Test(prefix, bad_arguments_open_nothing)
{
	int32_t tokens[8] = { 1, 2, 3 };
	uint32_t cached = 5;
	kvp_seq *s = (kvp_seq *)1;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m");
	kvp_stats before = tenant_stats(t);
	cr_assert_eq(kvp_seq_open_prefix(t, &shape, 0, tokens, &s, &cached), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "n >= 1"), "%s", kvp_last_error());
	cr_assert_null(s);
	cr_assert_eq(cached, 0);
	cr_assert_eq(kvp_seq_open_prefix(t, &shape, 3, NULL, &s, &cached), KVP_EINVAL);
	cr_assert_eq(kvp_seq_open_prefix(t, &shape, 3, tokens, &s, NULL), KVP_EINVAL);
	kvp_shape bad = shape;
	bad.n_kv_heads = 3;
	cr_assert_eq(kvp_seq_open_prefix(t, &bad, 3, tokens, &s, &cached), KVP_EINVAL);
	cr_assert_eq(kvp_seq_open_prefix(NULL, &shape, 3, tokens, &s, &cached), KVP_EINVAL);
	kvp_stats after = tenant_stats(t);
	cr_assert_eq(memcmp(&before, &after, sizeof before), 0, "nothing was charged");
	kvp_pool_close(pool);
}

Test(prefix, failed_open_over_quota_leaves_nothing)
{
	int32_t tokens[400];
	uint32_t cached;
	kvp_seq *s;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,quota=8KiB");
	prompt_fill(tokens, 400, 11);
	kvp_stats before = tenant_stats(t);
	/* the entries waiting for the prompt's 50 units do not fit 8 KiB */
	cr_assert_eq(kvp_seq_open_prefix(t, &shape, 400, tokens, &s, &cached), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "kvp_seq_open_prefix"), "%s", kvp_last_error());
	kvp_stats after = tenant_stats(t);
	cr_assert_eq(after.bytes_meta, before.bytes_meta);
	cr_assert_eq(after.tokens_retained, 0);
	kvp_pool_close(pool);
}

/* ---- attention ---- */

/* Every layer's attention of the two sequences, for a few queries: equal to the bit. */
/* A hit, appended past its prompt, against a sequence that appended everything. */
static void hit_matches_cold(const char *spec)
{
	int32_t tokens[300];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", spec);
	prompt_fill(tokens, 300, 13);
	kvp_seq *cold = run_prompt(t, tokens, 100);
	kvp_seq *hit = open_prompt(t, tokens, 100, &cached);
	cr_assert_gt(cached, 64, "%s: %u", spec, cached);
	append_tokens(hit, tokens, cached, 100);
	assert_same_attention(cold, hit, spec);
	append_tokens(cold, tokens, 100, 300);
	append_tokens(hit, tokens, 100, 300);
	assert_same_attention(cold, hit, spec);
	kvp_stats sc = seq_stats(cold), sh = seq_stats(hit);
	cr_assert_eq(sc.tokens_retained, sh.tokens_retained, "%s", spec);
	cr_assert_eq(sc.bytes_compressed, sh.bytes_compressed, "%s", spec);
	kvp_pool_close(pool);
}

Test(prefix, hit_attention_is_bit_identical_to_appending)
{
	hit_matches_cold("model=m,block=8,sinks=4,window=16");
	hit_matches_cold("model=m,block=16,sinks=0,window=16,store=fp16");
}

Test(prefix, hit_attention_is_bit_identical_with_a_cold_tier)
{
	/* the prompt's blocks turn cold in the append that fills them; the cache keeps them exact */
	hit_matches_cold("model=m,block=8,sinks=4,window=8,k=turboquant(bits=3),v=turboquant(bits=3)");
	hit_matches_cold("model=m,block=8,sinks=4,window=16,store=fp16,k=turboquant(bits=4),v=fp16");
}

/* The reference engine's attention through one kvpager sequence. */
static int seq_append(void *ctx, int layer, int pos, const float *k, const float *v)
{
	int32_t p = pos;
	return kvp_append(ctx, (uint32_t)layer, 1, &p, k, v) != KVP_OK;
}

static int seq_attend(void *ctx, int layer, int pos, const float *q, float *out)
{
	(void)pos;
	return kvp_attend(ctx, (uint32_t)layer, q, out) != KVP_OK;
}

/* Runs tokens[from..to) through the model on seq; logits of position p land in logits[p]. */
static void model_run(const struct llama_model *m, kvp_seq *seq, const int *tokens, int from, int to, float *logits)
{
	struct llama_attention att = { seq, seq_append, seq_attend, NULL };
	struct llama_state st;
	int vocab = m->config.vocab_size;
	cr_assert_eq(llama_state_init(&st, &m->config), LLAMA_OK);
	for (int pos = from; pos < to; pos++) {
		cr_assert_eq(llama_forward(m, &st, &att, NULL, tokens[pos], pos), LLAMA_OK, "%d: %s", pos, kvp_last_error());
		memcpy(logits + (size_t)pos * vocab, st.logits, (size_t)vocab * sizeof *logits);
	}
	llama_state_free(&st);
}

/* A prompt of kjv-64's own greedy text: the second sequence computes from n_cached on, and every logit
 * from there equals the first sequence's, which computed everything. */
static void model_hit_matches_cold(const char *spec)
{
	enum { PROMPT = 100, N = 130 };
	struct llama_model m;
	char err[LLAMA_ERROR_MAX];
	int tokens[N];
	int32_t prompt[PROMPT];
	uint32_t cached;
	cr_assert_eq(llama_model_load(&m, model_path("kjv-64.bin"), err), LLAMA_OK, "%s", err);
	kvp_shape sh = llama_model_shape(&m.config);
	size_t vocab = (size_t)m.config.vocab_size;
	float *cold = malloc(N * vocab * sizeof *cold), *hit = malloc(N * vocab * sizeof *hit);
	greedy_tokens(&m, tokens, N);
	for (int i = 0; i < PROMPT; i++)
		prompt[i] = tokens[i];
	pool_open("");
	kvp_tenant *t = tenant_open("t", spec);
	kvp_seq *a, *b;
	cr_assert_eq(kvp_seq_open_prefix(t, &sh, PROMPT, prompt, &a, &cached), KVP_OK, "%s", kvp_last_error());
	model_run(&m, a, tokens, 0, N, cold);
	cr_assert_eq(kvp_seq_open_prefix(t, &sh, PROMPT, prompt, &b, &cached), KVP_OK, "%s", kvp_last_error());
	cr_assert_geq(cached, 84, "%s: %u", spec, cached);
	model_run(&m, b, tokens, (int)cached, N, hit);
	cr_assert_eq(memcmp(cold + cached * vocab, hit + cached * vocab, (N - cached) * vocab * sizeof *hit), 0,
		     "%s: logits from position %u on differ", spec, cached);
	kvp_pool_close(pool);
	free(cold);
	free(hit);
	llama_model_free(&m);
}

Test(prefix, model_logits_after_a_hit_equal_computing_the_whole_prompt)
{
	model_hit_matches_cold("model=kjv-64,block=16,sinks=4,window=32");
	model_hit_matches_cold("model=kjv-64,block=16,sinks=4,window=16,store=fp16,k=turboquant(bits=3),"
			       "v=turboquant(bits=3)");
}

/* ---- tenants ---- */

Test(prefix, tenants_do_not_find_each_others_prompts_without_share_prefix)
{
	int32_t tokens[60];
	uint32_t cached;
	pool_open("");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	kvp_tenant *b = tenant_open("b", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 60, 17);
	kvp_seq *sa = run_prompt(a, tokens, 60);
	kvp_seq_close(sa);
	kvp_stats a_before = tenant_stats(a);
	cr_assert_gt(a_before.bytes_cached, 0);
	kvp_seq *sb = open_prompt(b, tokens, 60, &cached);
	cr_assert_eq(cached, 0, "b cannot learn that a cached the prompt");
	append_tokens(sb, tokens, 0, 60);
	kvp_stats a_after = tenant_stats(a), b_stats = tenant_stats(b);
	cr_assert_eq(memcmp(&a_before, &a_after, sizeof a_before), 0, "a's stats do not move with b's calls");
	cr_assert_eq(b_stats.prefix_hit_tokens, 0);
	cr_assert_eq(b_stats.prefix_miss_tokens, 52);
	/* and each finds its own */
	kvp_seq_close(open_prompt(a, tokens, 60, &cached));
	cr_assert_eq(cached, 52);
	kvp_seq_close(open_prompt(b, tokens, 60, &cached));
	cr_assert_eq(cached, 52);
	kvp_pool_close(pool);
}

/* What b sees of one prompt, after a cached it or not. */
static void b_view(int a_cached_it, uint32_t *cached, kvp_stats *b_stats)
{
	int32_t tokens[60];
	pool_open("");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	kvp_tenant *b = tenant_open("b", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 60, 18);
	if (a_cached_it)
		kvp_seq_close(run_prompt(a, tokens, 60));
	kvp_seq *sb = open_prompt(b, tokens, 60, cached);
	append_tokens(sb, tokens, *cached, 60);
	*b_stats = tenant_stats(b);
	kvp_pool_close(pool);
}

Test(prefix, a_tenant_cannot_learn_whether_another_cached_a_prompt)
{
	kvp_stats with = { 0 }, without = { 0 };
	uint32_t cached_with, cached_without;
	b_view(1, &cached_with, &with);
	b_view(0, &cached_without, &without);
	cr_assert_eq(cached_with, cached_without);
	cr_assert_eq(memcmp(&with, &without, sizeof with), 0, "b's counters are the same either way");
}

Test(prefix, share_prefix_hits_are_copies_paid_by_the_caller)
{
	int32_t tokens[60];
	uint32_t cached;
	pool_open("share_prefix=1");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	kvp_tenant *b = tenant_open("b", "model=m,block=8,sinks=4,quota=1MiB");
	prompt_fill(tokens, 60, 19);
	kvp_seq *sa = run_prompt(a, tokens, 60);
	kvp_stats a_before = tenant_stats(a), b_before = tenant_stats(b);
	kvp_seq *sb = open_prompt(b, tokens, 60, &cached);
	cr_assert_eq(cached, 52);
	kvp_stats a_after = tenant_stats(a), b_after = tenant_stats(b);
	cr_assert_eq(a_after.bytes_exact, a_before.bytes_exact, "a's memory is not b's");
	cr_assert_eq(b_after.bytes_exact - b_before.bytes_exact, seq_stats(sb).bytes_exact, "b pays for its copies");
	cr_assert_gt(b_after.bytes_exact, 0);
	append_tokens(sb, tokens, cached, 60);
	assert_same_attention(sa, sb, "copies");
	/* b's copies are b's: closing a leaves them whole */
	kvp_tenant_close(a);
	assert_same_attention(sb, sb, "after a closed");
	kvp_pool_close(pool);
}

Test(prefix, tenant_close_drops_its_entries)
{
	int32_t tokens[60];
	uint32_t cached;
	pool_open("");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 60, 23);
	run_prompt(a, tokens, 60);
	kvp_tenant_close(a);
	a = tenant_open("a", "model=m,block=8,sinks=4");
	open_prompt(a, tokens, 60, &cached);
	cr_assert_eq(cached, 0);
	kvp_pool_close(pool);
}

/* With share_prefix=1 a chain crosses tenants: b's units extend a's. When a closes, b's units stay (they
 * are b's memory, relief frees them), and when b caches the start of the chain again they count on it,
 * so relief frees b's chain from its end. */
Test(prefix, chain_across_tenants_outlives_its_first_tenant)
{
	int32_t tokens[84];
	uint32_t cached;
	struct kvp_call call = { 0 };
	pool_open("share_prefix=1");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	kvp_tenant *b = tenant_open("b", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 84, 29);
	kvp_seq_close(run_prompt(a, tokens, 60));
	kvp_seq *s = open_prompt(b, tokens, 84, &cached);
	cr_assert_eq(cached, 60, "a's units 0..7");
	append_tokens(s, tokens, cached, 84);
	kvp_seq_close(s);
	kvp_tenant_close(a);
	kvp_seq_close(run_prompt(b, tokens, 84)); /* units 0..7 are b's now, 8..10 were */
	cr_assert(kvp_prefix_relieve(kvp_tenant_from_handle(b), 1, &call));
	kvp_seq_close(open_prompt(b, tokens, 84, &cached));
	cr_assert_eq(cached, 76, "relief took the chain's last unit, not a parent of the others: %u cached", cached);
	unsigned freed = 1;
	while (kvp_prefix_relieve(kvp_tenant_from_handle(b), 1, &call))
		freed++;
	cr_assert_eq(freed, 11, "b's 11 units: %u", freed);
	cr_assert_eq(tenant_stats(b).bytes_cached, 0);
	kvp_pool_close(pool);
}

/* ---- memory ---- */

Test(prefix, closed_sequences_leave_their_prompt_cached)
{
	int32_t tokens[62];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 62, 29);
	kvp_seq *a = run_prompt(t, tokens, 62);
	cr_assert_eq(tenant_stats(t).bytes_cached, 0, "every cached block is the sequence's too");
	cr_assert_eq(seq_stats(a).bytes_cached, 0);
	uint64_t exact = tenant_stats(t).bytes_exact;
	kvp_seq_close(a);
	kvp_stats st = tenant_stats(t);
	cr_assert_gt(st.bytes_cached, 0);
	cr_assert_lt(st.bytes_exact, exact, "the tail block went with the sequence");
	cr_assert_leq(st.bytes_cached, st.bytes_exact + st.bytes_meta);
	kvp_seq *b = open_prompt(t, tokens, 62, &cached);
	cr_assert_eq(cached, 60);
	cr_assert_eq(tenant_stats(t).bytes_cached, 0, "the new sequence holds them");
	kvp_seq_close(b);
	kvp_pool_close(pool);
}

/* Fills the cache with `prompts` prompts of 100 tokens, closed, then charges a sequence of other tokens
 * until it passes what the quota leaves: the cached entries go first. */
static void pressure_frees_cache(const char *pool_spec)
{
	int32_t tokens[3][100], other[400];
	uint32_t cached;
	pool_open(pool_spec);
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,quota=256KiB");
	for (int i = 0; i < 3; i++) {
		prompt_fill(tokens[i], 100, 1000 * (i + 1));
		kvp_seq_close(run_prompt(t, tokens[i], 100));
	}
	kvp_stats full = tenant_stats(t);
	cr_assert_gt(full.bytes_cached, 60000, "%llu", (unsigned long long)full.bytes_cached);
	/* an idle sequence that pressure could spill: it must not be touched while the cache has room */
	kvp_seq *idle = run_prompt(t, tokens[0], 40);
	prompt_fill(other, 400, 7);
	kvp_seq *s;
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK);
	append_tokens(s, other, 0, 200);
	kvp_stats st = tenant_stats(t);
	cr_assert_lt(st.bytes_cached, full.bytes_cached, "the cache paid for the charge");
	cr_assert_eq(st.bytes_spilled, 0, "no sequence was spilled while the cache could pay");
	cr_assert_eq(seq_stats(idle).bytes_spilled, 0);
	/* least recently used first: the most recent prompts are still whole, the oldest lost its end */
	kvp_seq_close(open_prompt(t, tokens[2], 100, &cached));
	cr_assert_eq(cached, 92, "%u", cached);
	kvp_seq_close(open_prompt(t, tokens[1], 100, &cached));
	cr_assert_eq(cached, 92, "%u", cached);
	kvp_seq_close(open_prompt(t, tokens[0], 100, &cached));
	cr_assert_lt(cached, 92, "%u", cached);
	cr_assert_geq(cached, 36, "the idle sequence holds the first units: %u", cached);
	kvp_pool_close(pool);
}

Test(prefix, pressure_frees_cached_blocks_first_without_spill)
{
	pressure_frees_cache("");
}

Test(prefix, pressure_frees_cached_blocks_before_spilling)
{
	spill_fixture_open("4MiB", NULL);
	pressure_frees_cache(spill_spec);
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(prefix, pinned_prompt_stays_shared_through_rounds)
{
	int32_t tokens[300];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=8,pin_prompt=1,"
					  "policy=triattention(budget=100,every=8,stats=online)");
	prompt_fill(tokens, 300, 31);
	kvp_seq *a = run_prompt(t, tokens, 60);
	cr_assert_eq(kvp_seq_step(a), KVP_OK);
	for (uint32_t i = 60; i < 300; i++) {
		append_tokens(a, tokens, i, i + 1);
		cr_assert_eq(kvp_seq_step(a), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_lt(seq_stats(a).tokens_retained, 300ull * L * NKV, "rounds dropped tokens");
	cr_assert_eq(tenant_stats(t).bytes_cached, 0, "the prompt's blocks are still the sequence's");
	uint64_t exact = tenant_stats(t).bytes_exact;
	kvp_seq *b = open_prompt(t, tokens, 60, &cached);
	cr_assert_eq(cached, 52);
	cr_assert_eq(tenant_stats(t).bytes_exact, exact, "the hit shares the blocks: no bytes doubled");
	kvp_seq_close(b);
	kvp_pool_close(pool);
}

Test(prefix, rounds_leave_cached_blocks_as_they_were)
{
	int32_t tokens[300];
	uint32_t cached;
	pool_open("");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,window=8,policy=triattention(budget=40,every=8,stats=online)");
	prompt_fill(tokens, 300, 37);
	kvp_seq *a = run_prompt(t, tokens, 60);
	for (uint32_t i = 60; i < 200; i++) {
		append_tokens(a, tokens, i, i + 1);
		cr_assert_eq(kvp_seq_step(a), KVP_OK, "%s", kvp_last_error());
	}
	cr_assert_gt(tenant_stats(t).bytes_cached, 0, "the prompt's blocks left a's streams");
	kvp_seq *b = open_prompt(t, tokens, 60, &cached);
	cr_assert_eq(cached, 52, "the rounds compacted a's copy, never the cache's");
	kvp_seq *ref;
	cr_assert_eq(kvp_seq_open(t, &shape, &ref), KVP_OK);
	append_tokens(ref, tokens, 0, 60);
	append_tokens(b, tokens, 52, 60);
	assert_same_attention(ref, b, "after rounds");
	kvp_pool_close(pool);
}

/* Racers (prefix_fixture.h) under a quota about what the prompts' blocks and four sequences take: pressure
 * frees cached units while others are looked up, and refuses an open or an append now and then when the
 * other racers' sequences hold it all. */
#define RACERS 4
#define ROUNDS 40

Test(prefix, threads_share_prompts_under_pressure_and_attention_stays_exact)
{
	static int32_t prompts[3][RACE_PROMPT];
	static float expected[3][L][NH * D];
	pthread_t th[RACERS];
	struct racer r[RACERS];
	pool_open("");
	kvp_tenant *plain = tenant_open("plain", "block=8,sinks=4");
	kvp_tenant *t = tenant_open("t", "model=m,block=8,sinks=4,quota=170KiB");
	race_prompts(plain, prompts, expected);
	for (uint32_t i = 0; i < RACERS; i++) {
		r[i] = (struct racer){ .t = t, .prompts = (const int32_t (*)[RACE_PROMPT])prompts,
				       .expected = (const float (*)[L][NH * D])expected, .seed = i, .rounds = ROUNDS };
		cr_assert_eq(pthread_create(&th[i], NULL, race, &r[i]), 0);
	}
	uint32_t hits = 0, refused = 0, opened = 0;
	for (uint32_t i = 0; i < RACERS; i++) {
		pthread_join(th[i], NULL);
		cr_expect_eq(r[i].failure[0], '\0', "racer %u: %s", i, r[i].failure);
		hits += r[i].hits;
		refused += r[i].refused;
		opened += r[i].opened;
	}
	kvp_stats st = tenant_stats(t);
	/* how many the quota refuses depends on how the racers overlap: only that most get through */
	cr_assert_gt(hits, RACERS * ROUNDS / 4, "%u hits", hits);
	cr_assert_lt(refused, RACERS * ROUNDS / 2, "%u refused", refused);
	cr_assert_eq(st.tokens_retained, 0);
	cr_assert_eq(st.prefix_hit_tokens + st.prefix_miss_tokens, (uint64_t)opened * 116, "a refused open counts nothing");
	cr_assert_gt(st.bytes_cached, 0);
	cr_assert_leq(st.bytes_exact + st.bytes_meta, 170 * 1024);
	kvp_pool_close(pool);
}

/* ---- records: what a tier beyond the pool would move ---- */

Test(prefix, records_carry_a_prompt_to_another_pool)
{
	int32_t tokens[62];
	void *rec[8];
	size_t bytes[8];
	uint32_t cached;
	kvp_pool *first;
	prompt_fill(tokens, 62, 41);
	pool_open("");
	first = pool;
	kvp_tenant *a = tenant_open("t", "model=m,block=8,sinks=4");
	kvp_seq *sa = run_prompt(a, tokens, 62);
	for (uint32_t u = 0; u < 8; u++)
		cr_assert_eq(kvp_prefix_record_make(kvp_tenant_from_handle(a), &shape, tokens, u, &rec[u], &bytes[u]),
			     KVP_OK, "%s", kvp_last_error());
	pool_open("");
	kvp_tenant *b = tenant_open("t", "model=m,block=8,sinks=4");
	struct kvp_tenant_obj *tb = kvp_tenant_from_handle(b);
	cr_assert_eq(kvp_prefix_record_install(tb, &shape, tokens, 1, rec[1], bytes[1]), KVP_EINVAL, "a child before its parent");
	for (uint32_t u = 0; u < 8; u++)
		cr_assert_eq(kvp_prefix_record_install(tb, &shape, tokens, u, rec[u], bytes[u]), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_prefix_record_install(tb, &shape, tokens, 3, rec[3], bytes[3]), KVP_OK, "installing twice is a no-op");
	cr_assert_gt(tenant_stats(b).bytes_cached, 0, "b's memory holds them");
	kvp_seq *sb = open_prompt(b, tokens, 62, &cached);
	cr_assert_eq(cached, 60);
	append_tokens(sb, tokens, 60, 62);
	assert_same_attention(sa, sb, "installed from records");
	kvp_pool_close(pool);
	kvp_pool_close(first);
	for (uint32_t u = 0; u < 8; u++)
		free(rec[u]);
}

Test(prefix, records_that_fail_their_checks_are_refused)
{
	int32_t tokens[30];
	void *rec;
	size_t bytes;
	pool_open("");
	kvp_tenant *a = tenant_open("a", "model=m,block=8,sinks=4");
	prompt_fill(tokens, 30, 43);
	run_prompt(a, tokens, 30);
	cr_assert_eq(kvp_prefix_record_make(kvp_tenant_from_handle(a), &shape, tokens, 0, &rec, &bytes), KVP_OK);
	kvp_tenant *other = tenant_open("b", "model=m,block=8,sinks=4");
	kvp_tenant *model = tenant_open("c", "model=n,block=8,sinks=4");
	kvp_tenant *fp16 = tenant_open("d", "model=m,block=8,sinks=4,store=fp16");
	cr_assert_eq(kvp_prefix_record_install(kvp_tenant_from_handle(other), &shape, tokens, 0, rec, bytes), KVP_ECORRUPT,
		     "another tenant's namespace");
	cr_assert_eq(kvp_prefix_record_install(kvp_tenant_from_handle(model), &shape, tokens, 0, rec, bytes), KVP_ECORRUPT);
	cr_assert_eq(kvp_prefix_record_install(kvp_tenant_from_handle(fp16), &shape, tokens, 0, rec, bytes), KVP_ECORRUPT);
	cr_assert_eq(kvp_prefix_record_install(kvp_tenant_from_handle(a), &shape, tokens, 0, rec, bytes - 1), KVP_ECORRUPT);
	((unsigned char *)rec)[bytes - 1] ^= 1; /* the last stream's payload */
	cr_assert_eq(kvp_prefix_record_install(kvp_tenant_from_handle(a), &shape, tokens, 0, rec, bytes), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "CRC32C"), "%s", kvp_last_error());
	kvp_stats st = tenant_stats(other);
	cr_assert_eq(st.bytes_exact + st.bytes_cached, 0, "a refused record leaves nothing");
	free(rec);
	kvp_pool_close(pool);
}

Test(prefix, plugin_table_serves_seq_open_prefix)
{
	const kvp_plugin_v1 *p = kvp_plugin(KVP_ABI_MAJOR);
	cr_assert_not_null(p);
	cr_assert_geq(p->abi_minor, 3);
	cr_assert_eq(p->seq_open_prefix, kvp_seq_open_prefix);
}
