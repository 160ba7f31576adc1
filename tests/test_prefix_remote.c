/*
 * Prefix caching across pools through the remote tier (pool remote=): real redis-server processes, a
 * single server and a three-node cluster, started and stopped by the suite (tests/redis_fixture.h).
 * What one pool registers is published; a fresh pool (another process included) finds it, installs it
 * checked, and attends exactly as the first; every fault is a miss with a note.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/crc32c.h"
#include "kvpager.h"
#include "pager/pager.h"
#include "prefix_fixture.h"
#include "redis_fixture.h"
#include "tier/remote.h"

TestSuite(prefix_remote, .fini = redis_fixture_fini);

#define PROMPT 62 /* block=8, sinks=4: units of 4 + 7 x 8 = 60 tokens before the last two */
#define TENANT_SPEC "model=m,block=8,sinks=4,window=16"
/* a cold tier whose units travel compressed: 60 tokens leave blocks 1..5 cold */
#define COLD_SPEC TENANT_SPEC ",k=turboquant(bits=3),v=turboquant(bits=3),store=fp16"

static kvp_pool *pool_at(const char *remote, const char *more)
{
	char spec[512];
	kvp_pool *p;
	snprintf(spec, sizeof spec, "remote=%s,remote_timeout=500%s%s", remote, more ? "," : "", more ? more : "");
	cr_assert_eq(kvp_pool_open(spec, &p), KVP_OK, "%s: %s", spec, kvp_last_error());
	return p;
}

static kvp_tenant *tenant_in(kvp_pool *p, const char *name, const char *spec)
{
	kvp_tenant *t;
	cr_assert_eq(kvp_tenant_open(p, name, spec, &t), KVP_OK, "%s: %s", spec, kvp_last_error());
	return t;
}

static kvp_remote_stats remote_stats(kvp_pool *p)
{
	kvp_remote_stats r = { .size = sizeof r };
	cr_assert_eq(kvp_pool_remote_stats(p, &r), KVP_OK, "%s", kvp_last_error());
	return r;
}

/* Every publication reached the server: the queue emptied and no write failed (a failed write is dropped,
 * as a cache may drop it, so an empty queue alone does not say the server holds the values). */
static int all_published(kvp_pool *p)
{
	kvp_remote_stats r;
	if (kvp_pool_flush(p, 5000) != KVP_OK)
		return 0;
	r = remote_stats(p);
	return r.faults == 0 && r.dropped == 0;
}

static void drained(kvp_pool *p)
{
	cr_assert_eq(kvp_pool_flush(p, 5000), KVP_OK, "publication did not drain: %s", kvp_last_error());
}

/* A pool whose tenant (under spec) ran the prompt's PROMPT tokens and published them: the server holds
 * every value. *sa, when sa is not NULL, gets the sequence that ran it. */
static kvp_pool *published(const char *url, const char *tenant, const char *spec, const int32_t *tokens, kvp_seq **sa)
{
	kvp_pool *a = pool_at(url, NULL);
	kvp_seq *s = run_prompt(tenant_in(a, tenant, spec), tokens, PROMPT);
	drained(a);
	if (sa)
		*sa = s;
	return a;
}

static void single_url(int server, char *url, size_t cap)
{
	snprintf(url, cap, "redis://127.0.0.1:%d", redis_port(server));
}

/* Pool a runs the prompt and publishes it; a fresh pool b opens it: the whole prefix, from the remote. */
static void second_pool_finds_the_prompt(const char *url)
{
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *sb;
	prompt_fill(tokens, PROMPT, 5);
	kvp_seq *sa;
	kvp_pool *a = published(url, "t", TENANT_SPEC, tokens, &sa);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", TENANT_SPEC);
	cr_assert_eq(kvp_seq_open_prefix(tb, &shape, PROMPT, tokens, &sb, &cached), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(cached, 60);
	kvp_stats st = seq_stats(sb);
	cr_assert_eq(st.remote_hit_tokens, 60);
	cr_assert_eq(st.remote_faults + st.remote_rejected, 0);
	append_tokens(sb, tokens, cached, PROMPT);
	assert_same_attention(sa, sb, url);
	kvp_seq_close(sb);
	cr_assert_gt(tenant_stats(tb).bytes_cached, 0, "the fetched units stay in b's cache");
	kvp_pool_close(b);
	kvp_pool_close(a);
}

Test(prefix_remote, second_pool_finds_the_prompt_on_one_server)
{
	char url[64];
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	second_pool_finds_the_prompt(url);
}

Test(prefix_remote, second_pool_finds_the_prompt_on_a_cluster)
{
	char url[128];
	redis_fixture_need();
	int first = redis_cluster_start();
	snprintf(url, sizeof url, "redis-cluster://127.0.0.1:%d|127.0.0.1:%d", redis_port(first), redis_port(first + 1));
	second_pool_finds_the_prompt(url);
	long long keys = 0;
	for (int i = first; i < first + 3; i++) {
		redisReply *r = redis_run(redis_port(i), "DBSIZE");
		cr_assert(r && r->type == REDIS_REPLY_INTEGER);
		cr_assert_gt(r->integer, 0, "node %d holds none of the 8 units", i - first);
		keys += r->integer;
		freeReplyObject(r);
	}
	cr_assert_eq(keys, 8);
}

/* The first process writes its attention outputs to a pipe; the second computes its own after a remote hit. */
static void attention_outputs(kvp_seq *s, float *out)
{
	float q[NH * D];
	for (uint32_t l = 0; l < L; l++) {
		fixture_fill(q, NH * D, 900 + l, 1.0f);
		cr_assert_eq(kvp_attend(s, l, q, out + (size_t)l * NH * D), KVP_OK, "%s", kvp_last_error());
	}
}

static void two_processes_share_a_prompt(const char *tenant_spec, uint32_t cold_blocks)
{
	char url[64];
	int32_t tokens[PROMPT];
	float first[L * NH * D], second[L * NH * D];
	int fd[2], status;
	uint32_t cached;
	kvp_seq *s;
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	prompt_fill(tokens, PROMPT, 9);
	cr_assert_eq(pipe(fd), 0);
	pid_t child = fork();
	cr_assert_geq(child, 0);
	if (child == 0) { /* the first process: its own pool, the whole prompt computed */
		char spec[96];
		kvp_pool *p;
		kvp_tenant *t;
		snprintf(spec, sizeof spec, "remote=%s,remote_timeout=500", url); /* as pool_at's, for a loaded machine */
		int ok = kvp_pool_open(spec, &p) == KVP_OK &&
			 kvp_tenant_open(p, "t", tenant_spec, &t) == KVP_OK &&
			 kvp_seq_open_prefix(t, &shape, PROMPT, tokens, &s, &cached) == KVP_OK &&
			 append_layers(s, tokens, 0, PROMPT, 0, L) == KVP_OK;
		if (ok) {
			attention_outputs(s, first);
			ok = all_published(p) &&
			     write(fd[1], first, sizeof first) == (ssize_t)sizeof first;
			kvp_pool_close(p);
		}
		_exit(ok ? 0 : 1);
	}
	close(fd[1]);
	cr_assert_eq(read(fd[0], first, sizeof first), (ssize_t)sizeof first, "the first process failed");
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	kvp_pool *p = pool_at(url, NULL);
	cr_assert_eq(kvp_seq_open_prefix(tenant_in(p, "t", tenant_spec), &shape, PROMPT, tokens, &s, &cached), KVP_OK);
	cr_assert_eq(cached, 60, "the whole prefix");
	cr_assert_eq(kvp_seq_from_handle(s)->streams[0].n_cold, cold_blocks);
	append_tokens(s, tokens, cached, PROMPT);
	attention_outputs(s, second);
	cr_assert_eq(memcmp(first, second, sizeof first), 0, "attention differs from the first process's");
	kvp_pool_close(p);
}

Test(prefix_remote, two_processes_share_a_prompt_bit_for_bit)
{
	two_processes_share_a_prompt(TENANT_SPEC, 0);
}

Test(prefix_remote, two_processes_share_a_cold_tiers_prompt_bit_for_bit)
{
	two_processes_share_a_prompt(COLD_SPEC, 5);
}

Test(prefix_remote, tenants_namespaces_stay_apart_unless_shared)
{
	char url[64], shared[96];
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	prompt_fill(tokens, PROMPT, 21);
	kvp_pool *a = published(url, "alice", TENANT_SPEC, tokens, NULL);
	kvp_pool *b = pool_at(url, NULL);
	cr_assert_eq(kvp_seq_open_prefix(tenant_in(b, "bob", TENANT_SPEC), &shape, PROMPT, tokens, &s, &cached), KVP_OK);
	cr_assert_eq(cached, 0, "bob must not find alice's prompt");
	snprintf(shared, sizeof shared, "%s", url);
	kvp_pool *c = pool_at(shared, "share_prefix=1");
	run_prompt(tenant_in(c, "alice", TENANT_SPEC), tokens, PROMPT);
	drained(c);
	kvp_pool *d = pool_at(shared, "share_prefix=1");
	cr_assert_eq(kvp_seq_open_prefix(tenant_in(d, "bob", TENANT_SPEC), &shape, PROMPT, tokens, &s, &cached), KVP_OK);
	cr_assert_eq(cached, 60, "with share_prefix=1 the namespace is the model's");
	kvp_pool_close(d), kvp_pool_close(c), kvp_pool_close(b), kvp_pool_close(a);
}

/* Every unit's value on the server, with the byte from_end bytes before its end flipped. */
static int corrupt_keys(int server, size_t from_end)
{
	redisReply *keys = redis_run(redis_port(server), "KEYS kvp:*");
	int n = 0;
	cr_assert(keys && keys->type == REDIS_REPLY_ARRAY);
	for (size_t i = 0; i < keys->elements; i++) {
		redisReply *v = redis_run(redis_port(server), "GET %s", keys->element[i]->str);
		cr_assert(v && v->type == REDIS_REPLY_STRING && v->len > from_end);
		v->str[v->len - 1 - from_end] ^= 0x10;
		redisReply *set = redis_run(redis_port(server), "SET %s %b", keys->element[i]->str, v->str, (size_t)v->len);
		cr_assert(set);
		freeReplyObject(set);
		freeReplyObject(v);
		n++;
	}
	freeReplyObject(keys);
	return n;
}

Test(prefix_remote, values_that_fail_their_checks_are_misses_never_served)
{
	char url[64];
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	prompt_fill(tokens, PROMPT, 33);
	kvp_pool *a = published(url, "t", TENANT_SPEC, tokens, NULL);
	cr_assert_eq(corrupt_keys(server, 3), 8);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", TENANT_SPEC);
	cr_assert_eq(kvp_seq_open_prefix(tb, &shape, PROMPT, tokens, &s, &cached), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(cached, 0);
	cr_assert(strstr(kvp_last_error(), "CRC32C"), "the note names the check: %s", kvp_last_error());
	kvp_stats st = seq_stats(s);
	cr_assert_eq(st.remote_rejected, 1, "the chain stops at its first bad unit");
	cr_assert_eq(tenant_stats(tb).bytes_cached, 0, "nothing of it is kept");
	append_tokens(s, tokens, 0, PROMPT); /* and the sequence works as a cold one */
	kvp_pool_close(b), kvp_pool_close(a);
}

/* A lookup against a server that is gone or paused: a miss, a fault in stats, a note, within a bound. */
static void lookup_misses_within_the_timeout(int server, const char *url)
{
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	prompt_fill(tokens, PROMPT, 47);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", TENANT_SPEC);
	(void)server;
	double t0 = redis_fixture_ms();
	cr_assert_eq(kvp_seq_open_prefix(tb, &shape, PROMPT, tokens, &s, &cached), KVP_OK, "%s", kvp_last_error());
	double ms = redis_fixture_ms() - t0;
	cr_assert_eq(cached, 0);
	cr_assert_lt(ms, 20 * 500.0, "%.0f ms: a fault costs at most about the timeout", ms);
	cr_assert_eq(seq_stats(s).remote_faults, 1, "counted");
	cr_assert_eq(tenant_stats(tb).remote_faults, 1);
	cr_assert(strstr(kvp_last_error(), "remote tier"), "a note: %s", kvp_last_error());
	append_tokens(s, tokens, 0, PROMPT);
	kvp_pool_close(b);
}

/* The prompt's 8 units, counted by the pool as the server counts its keys. */
Test(prefix_remote, flush_returns_once_every_unit_is_stored)
{
	char url[64];
	int32_t tokens[PROMPT];
	kvp_remote_stats r;
	redisReply *keys;
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	prompt_fill(tokens, PROMPT, 21);
	kvp_pool *a = pool_at(url, NULL);
	run_prompt(tenant_in(a, "t", TENANT_SPEC), tokens, PROMPT);
	cr_assert_eq(kvp_pool_flush(a, 10000), KVP_OK, "%s", kvp_last_error());
	r = remote_stats(a);
	cr_assert_eq(r.queued, 0);
	cr_assert_eq(r.published, 8);
	cr_assert_eq(r.dropped, 0);
	cr_assert_gt(r.bytes_published, 0);
	keys = redis_run(redis_port(server), "DBSIZE");
	cr_assert(keys && keys->type == REDIS_REPLY_INTEGER);
	cr_assert_eq(keys->integer, 8, "the server holds what the pool counts as published");
	freeReplyObject(keys);
	kvp_pool_close(a);
}

/* A server that does not run holds the units in the queue: flush says so; once it runs, they are stored. */
Test(prefix_remote, flush_is_busy_while_the_server_does_not_answer)
{
	char url[64];
	int32_t tokens[PROMPT];
	kvp_remote_stats r;
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	prompt_fill(tokens, PROMPT, 22);
	char spec[128];
	kvp_pool *a;
	kvp_seq *s;
	uint32_t cached;
	/* a writer's patience of 3 s: the pause below never outlasts it, however busy the machine */
	snprintf(spec, sizeof spec, "remote=%s,remote_timeout=3000", url);
	cr_assert_eq(kvp_pool_open(spec, &a), KVP_OK, "%s", kvp_last_error());
	s = open_prompt(tenant_in(a, "t", TENANT_SPEC), tokens, PROMPT, &cached); /* looked up while it runs */
	kill(redis_pid(server), SIGSTOP);
	append_tokens(s, tokens, cached, PROMPT);
	cr_assert_eq(kvp_pool_flush(a, 20), KVP_EBUSY);
	cr_assert(strstr(kvp_last_error(), "still queued"), "%s", kvp_last_error());
	r = remote_stats(a);
	cr_assert_gt(r.queued, 0);
	cr_assert_eq(r.published, 0);
	kill(redis_pid(server), SIGCONT);
	cr_assert_eq(kvp_pool_flush(a, 10000), KVP_OK, "%s", kvp_last_error());
	r = remote_stats(a);
	cr_assert_eq(r.queued, 0);
	cr_assert_eq(r.published + r.dropped, 8);
	cr_assert_eq(r.dropped, 0, "the writer waited for the server");
	kvp_pool_close(a);
}

Test(prefix_remote, without_a_remote_tier_stats_are_zero_and_flush_returns_at_once)
{
	kvp_pool *p;
	kvp_remote_stats r = { .size = sizeof r, .published = 7 };
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_pool_remote_stats(p, &r), KVP_OK);
	cr_assert_eq(r.published + r.queued + r.dropped + r.bytes_published + r.faults, 0);
	cr_assert_eq(kvp_pool_flush(p, 0), KVP_OK);
	kvp_pool_close(p);
}

Test(prefix_remote, remote_stats_fill_an_older_struct_up_to_its_size_and_refuse_bad_input)
{
	kvp_pool *p;
	kvp_remote_stats r;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	memset(&r, 0xab, sizeof r);
	r.size = offsetof(kvp_remote_stats, published); /* a host that knows only queued */
	cr_assert_eq(kvp_pool_remote_stats(p, &r), KVP_OK);
	cr_assert_eq(r.queued, 0);
	cr_assert_eq(r.published, 0xababababababababull, "past its size the struct is not touched");
	r.size = 0;
	cr_assert_eq(kvp_pool_remote_stats(p, &r), KVP_EABI);
	cr_assert(strstr(kvp_last_error(), "size"), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_remote_stats(p, NULL), KVP_EABI);
	kvp_pool_close(p);
	r.size = sizeof r;
	cr_assert_eq(kvp_pool_remote_stats(p, &r), KVP_EPERM, "a closed pool");
	cr_assert_eq(kvp_pool_flush(p, 0), KVP_EPERM, "a closed pool");
	cr_assert_eq(kvp_pool_flush(NULL, 0), KVP_EINVAL);
}

Test(prefix_remote, killed_server_is_a_miss_with_a_note)
{
	char url[64];
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	redis_kill(server);
	lookup_misses_within_the_timeout(server, url);
}

Test(prefix_remote, paused_server_is_a_miss_within_the_timeout)
{
	char url[64];
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	kvp_pool *warm = pool_at(url, NULL); /* connections made before the pause */
	kill(redis_pid(server), SIGSTOP);
	lookup_misses_within_the_timeout(server, url);
	kill(redis_pid(server), SIGCONT);
	kvp_pool_close(warm);
}

Test(prefix_remote, full_server_refuses_publication_and_nothing_breaks)
{
	char url[64];
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	redisReply *r = redis_run(redis_port(server), "CONFIG SET maxmemory 1");
	cr_assert(r);
	freeReplyObject(r);
	prompt_fill(tokens, PROMPT, 55);
	kvp_seq *sa;
	kvp_pool *a = published(url, "t", TENANT_SPEC, tokens, &sa);
	struct kvp_remote_counters c;
	kvp_remote_counters(kvp_pool_from_handle(a)->remote, &c);
	cr_assert_eq(c.published, 0);
	cr_assert_eq(c.dropped, 8, "every unit refused, and counted");
	kvp_pool *b = pool_at(url, NULL);
	cr_assert_eq(kvp_seq_open_prefix(tenant_in(b, "t", TENANT_SPEC), &shape, PROMPT, tokens, &s, &cached), KVP_OK);
	cr_assert_eq(cached, 0);
	append_tokens(s, tokens, 0, PROMPT);
	assert_same_attention(sa, s, "computed again");
	kvp_pool_close(b), kvp_pool_close(a);
}

/* ---- a cold tier: units that would be cold go compressed (":c"), as the owner's cold conversion encodes them ---- */

/* The keys on the server whose names end with ":c". */
static long long compressed_keys(int server)
{
	redisReply *keys = redis_run(redis_port(server), "KEYS kvp:*:c");
	cr_assert(keys && keys->type == REDIS_REPLY_ARRAY);
	long long n = (long long)keys->elements;
	freeReplyObject(keys);
	return n;
}

/* Pool a runs the prompt under `spec`, a fresh pool b opens it; b's sequence attends as a's does, after
 * more appends too. Returns the value bytes b fetched. */
static uint64_t remote_hit_bytes(const char *url, const char *tenant, const char *spec, uint32_t cold_blocks)
{
	int32_t tokens[PROMPT + 24];
	uint32_t cached;
	kvp_seq *sb;
	struct kvp_remote_counters c;
	prompt_fill(tokens, PROMPT + 24, 71);
	kvp_seq *sa;
	kvp_pool *a = published(url, tenant, spec, tokens, &sa);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tenant_b = tenant_in(b, tenant, spec);
	cr_assert_eq(kvp_seq_open_prefix(tenant_b, &shape, PROMPT, tokens, &sb, &cached), KVP_OK,
		     "%s", kvp_last_error());
	cr_assert_eq(cached, 60, "%u cached (%s)", cached, kvp_last_error());
	kvp_stats st = seq_stats(sb);
	cr_assert_eq(st.remote_hit_tokens, 60);
	cr_assert_eq(st.remote_faults + st.remote_rejected, 0);
	for (uint32_t i = 0; i < L * NKV; i++)
		cr_assert_eq(kvp_seq_from_handle(sb)->streams[i].n_cold, cold_blocks, "stream %u", i);
	append_tokens(sb, tokens, cached, PROMPT);
	assert_same_attention(sa, sb, spec);
	/* the fetched units stay in b's cache: the next sequence of b finds them there, cold ones included */
	kvp_seq *again = open_prompt(tenant_b, tokens, PROMPT, &cached);
	cr_assert_eq(cached, 60);
	cr_assert_eq(seq_stats(again).remote_hit_tokens, 0);
	cr_assert_eq(kvp_seq_from_handle(again)->streams[0].n_cold, cold_blocks);
	append_tokens(again, tokens, cached, PROMPT);
	assert_same_attention(sa, again, "from b's own cache");
	kvp_seq_close(again);
	append_tokens(sa, tokens, PROMPT, PROMPT + 24);
	append_tokens(sb, tokens, PROMPT, PROMPT + 24);
	assert_same_attention(sa, sb, "after 24 more tokens");
	kvp_remote_counters(kvp_pool_from_handle(b)->remote, &c);
	kvp_pool_close(b);
	kvp_pool_close(a);
	return c.bytes_fetched;
}

Test(prefix_remote, cold_tier_units_travel_compressed_and_attend_bit_for_bit)
{
	char url[64];
	redis_fixture_need();
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	/* 60 tokens: 56 after the sink, 16 of them in the window: blocks 1..5 cold, 6 and 7 exact */
	uint64_t tq3 = remote_hit_bytes(url, "cold", COLD_SPEC, 5);
	cr_assert_eq(compressed_keys(server), 7, "every block unit, never the sink, goes compressed too");
	/* SparK's default (quantize=auto, here rotated) needs no statistics of the stream: compressed as well */
	uint64_t spark = remote_hit_bytes(url, "spark", TENANT_SPEC ",k=spark(keep=0.5)|turboquant(bits=3),"
					  "v=turboquant(bits=3),store=fp16", 5);
	cr_assert_eq(compressed_keys(server), 14);
	uint64_t fp16 = remote_hit_bytes(url, "exact", TENANT_SPEC ",store=fp16", 0);
	cr_log_info("bytes fetched: tq3 %llu, spark|tq3 %llu, fp16 %llu", (unsigned long long)tq3,
		    (unsigned long long)spark, (unsigned long long)fp16);
	cr_assert_lt(tq3, fp16 * 6 / 10, "tq3 moved %llu bytes, fp16 %llu", (unsigned long long)tq3,
		     (unsigned long long)fp16);
	cr_assert_lt(spark, fp16 * 6 / 10, "spark|tq3 moved %llu bytes, fp16 %llu", (unsigned long long)spark,
		     (unsigned long long)fp16);
}

/* Every compressed value on the server passed to `change` (its bytes, which it may rewrite in place). */
static void rewrite_compressed_values(int server, void (*change)(unsigned char *value, size_t len))
{
	redisReply *keys = redis_run(redis_port(server), "KEYS kvp:*:c");
	cr_assert(keys && keys->type == REDIS_REPLY_ARRAY && keys->elements == 7);
	for (size_t i = 0; i < keys->elements; i++) {
		redisReply *v = redis_run(redis_port(server), "GET %s", keys->element[i]->str);
		cr_assert(v && v->type == REDIS_REPLY_STRING && v->len > KVP_RECORD_HEADER + 4);
		change((unsigned char *)v->str, (size_t)v->len);
		freeReplyObject(redis_run(redis_port(server), "SET %s %b", keys->element[i]->str, v->str, (size_t)v->len));
		freeReplyObject(v);
	}
	freeReplyObject(keys);
}

/* Pool a publishes a cold tier's prompt, `change` rewrites every compressed value, and a fresh pool b
 * opens the prompt: the values are misses, b's note names why (`note`), and b computes the rest again. */
static void changed_compressed_values_are_misses(void (*change)(unsigned char *value, size_t len), const char *note)
{
	char url[64];
	int32_t tokens[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	prompt_fill(tokens, PROMPT, 83);
	kvp_seq *sa;
	kvp_pool *a = published(url, "t", COLD_SPEC, tokens, &sa);
	rewrite_compressed_values(server, change);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", COLD_SPEC);
	cr_assert_eq(kvp_seq_open_prefix(tb, &shape, PROMPT, tokens, &s, &cached), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(cached, 4, "only the sink, which goes exact");
	cr_assert(strstr(kvp_last_error(), note), "the note says why: %s", kvp_last_error());
	cr_assert_eq(seq_stats(s).remote_rejected, 1);
	append_tokens(s, tokens, cached, PROMPT);
	assert_same_attention(sa, s, "computed again");
	kvp_pool_close(b), kvp_pool_close(a);
}

static void flip_a_bit(unsigned char *value, size_t len)
{
	value[len - 5] ^= 0x10;
}

/* The first record gets a NaN as its first token's norm, and a checksum that matches (tier/record.c's:
 * the header but its CRC field, then the payload): the publisher's bytes as far as the checksum can
 * tell, but no encoder writes them. */
static void poison_a_norm(unsigned char *h, size_t len)
{
	static const unsigned char zero[4];
	const float nan = NAN;
	uint64_t payload;
	memcpy(&payload, h + 48, sizeof payload);
	cr_assert_leq(KVP_RECORD_HEADER + payload, len);
	memcpy(h + KVP_RECORD_HEADER, &nan, sizeof nan);
	uint32_t crc = kvp_crc32c(kvp_crc32c(kvp_crc32c(kvp_crc32c(0, h, 8), zero, 4), h + 12, KVP_RECORD_HEADER - 12),
				  h + KVP_RECORD_HEADER, (size_t)payload);
	memcpy(h + 8, &crc, sizeof crc);
}

Test(prefix_remote, corrupt_compressed_value_is_a_miss_never_served)
{
	redis_fixture_need();
	changed_compressed_values_are_misses(flip_a_bit, "CRC32C");
}

Test(prefix_remote, compressed_value_with_a_sound_checksum_but_codes_no_encoder_writes_is_a_miss)
{
	redis_fixture_need();
	changed_compressed_values_are_misses(poison_a_norm,
					     "unit 1, layer 0, KV head 0: turboquant: token 0's norm of part 0 is nan");
}

/* Where a block's codes depend on more than its rows, or it turns cold by more than its place, units go
 * exact only. */
static void publishes_exact_only(const char *spec)
{
	char url[64];
	int32_t tokens[PROMPT];
	int server = redis_start(NULL);
	single_url(server, url, sizeof url);
	prompt_fill(tokens, PROMPT, 91);
	kvp_pool *a = published(url, "t", spec, tokens, NULL);
	redisReply *r = redis_run(redis_port(server), "DBSIZE");
	cr_assert(r && r->type == REDIS_REPLY_INTEGER);
	cr_assert_eq(r->integer, 8, "%s: the 8 units exact", spec);
	freeReplyObject(r);
	cr_assert_eq(compressed_keys(server), 0, "%s: nothing compressed", spec);
	kvp_pool_close(a);
}

Test(prefix_remote, policy_tenant_publishes_exact_only)
{
	redis_fixture_need();
	publishes_exact_only(COLD_SPEC ",policy=h2o(heavy=0.5,recent=0.25)");
}

/* SparK in the channels' own basis fits its choice to the stream's queries. */
Test(prefix_remote, spark_tenant_with_query_statistics_publishes_exact_only)
{
	redis_fixture_need();
	publishes_exact_only(TENANT_SPEC ",k=spark(keep=0.5,quantize=kept)|turboquant(bits=3),v=turboquant(bits=3),"
					 "store=fp16");
}

/* A remote run shorter than asked has a later window start: its compressed units inside the window are
 * cut (here all of them: 44 tokens leave 3 cold blocks, 28 leave 1, 12 none). */
Test(prefix_remote, compressed_units_inside_a_shorter_runs_window_are_cut)
{
	char url[64];
	int32_t tokens[PROMPT], other[PROMPT];
	uint32_t cached;
	kvp_seq *s;
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	prompt_fill(tokens, PROMPT, 97);
	memcpy(other, tokens, sizeof other);
	for (uint32_t i = 44; i < PROMPT; i++)
		other[i] += 1000; /* units 0..5 shared, 6 and 7 not */
	kvp_pool *a = published(url, "t", COLD_SPEC, tokens, NULL);
	kvp_seq *fresh = run_prompt(tenant_in(a, "u", COLD_SPEC), other, PROMPT);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", COLD_SPEC);
	cr_assert_eq(kvp_seq_open_prefix(tb, &shape, PROMPT, other, &s, &cached), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(cached, 4, "the sink only");
	cr_assert_eq(kvp_seq_from_handle(s)->streams[0].n_cold, 0);
	append_tokens(s, other, cached, PROMPT);
	assert_same_attention(fresh, s, "after the cut");
	kvp_pool_close(b), kvp_pool_close(a);
}

/* A unit can be cached twice in one tenant: compressed (fetched from the remote tier) and exact (appended
 * by a sequence whose run was cut before it). Each entry counts on the parent entry it joined under, so
 * once no sequence holds them relief frees every unit of both chains, parents after their children. */
Test(prefix_remote, relief_frees_every_unit_cached_both_exact_and_compressed)
{
	char url[64];
	int32_t tokens[PROMPT];
	uint32_t cached;
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	prompt_fill(tokens, PROMPT, 101);
	kvp_pool *a = published(url, "t", COLD_SPEC, tokens, NULL);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", COLD_SPEC);
	kvp_seq *s = open_prompt(tb, tokens, PROMPT, &cached);
	cr_assert_eq(cached, 60);
	cr_assert_eq(kvp_seq_from_handle(s)->streams[0].n_cold, 5, "units 1..5 arrived compressed");
	kvp_seq_close(s);
	/* 20 tokens: a run of 12 holds no cold block, so the compressed unit 1 is cut and units 1 and 2 are
	 * appended and cached exact beside the compressed ones */
	s = open_prompt(tb, tokens, 20, &cached);
	cr_assert_eq(cached, 4, "the sink only");
	append_tokens(s, tokens, cached, 20);
	kvp_seq_close(s);
	kvp_stats full = tenant_stats(tb);
	cr_assert_gt(full.bytes_cached, 0);
	struct kvp_call call = { 0 };
	unsigned freed = 0;
	while (kvp_prefix_relieve(kvp_tenant_from_handle(tb), 1, &call))
		freed++;
	cr_assert_eq(freed, 10, "8 units of the fetched chain and 2 exact ones: %u freed", freed);
	cr_assert_eq(tenant_stats(tb).bytes_cached, 0, "%llu bytes of %llu still cached",
		     (unsigned long long)tenant_stats(tb).bytes_cached, (unsigned long long)full.bytes_cached);
	kvp_pool_close(b), kvp_pool_close(a);
}

/* Racers (prefix_fixture.h) under a quota that makes relief free cached units while others are registered
 * and published (a unit is published after the table's lock is released; relief leaves it until then).
 * Every sequence attends exactly as one that appended everything, and a fresh pool then finds each whole
 * prompt on the server. */
#define PUB_RACERS 3
#define PUB_ROUNDS 12

Test(prefix_remote, threads_publish_under_pressure_and_a_fresh_pool_finds_every_prompt)
{
	static int32_t prompts[3][RACE_PROMPT];
	static float expected[3][L][NH * D];
	char url[64];
	pthread_t th[PUB_RACERS];
	struct racer r[PUB_RACERS];
	redis_fixture_need();
	single_url(redis_start(NULL), url, sizeof url);
	kvp_pool *a = pool_at(url, NULL);
	kvp_tenant *t = tenant_in(a, "t", "model=m,block=8,sinks=4,quota=170KiB");
	race_prompts(tenant_in(a, "plain", "block=8,sinks=4"), prompts, expected);
	for (uint32_t i = 0; i < PUB_RACERS; i++) {
		r[i] = (struct racer){ .t = t, .prompts = (const int32_t (*)[RACE_PROMPT])prompts,
				       .expected = (const float (*)[L][NH * D])expected, .seed = i, .rounds = PUB_ROUNDS };
		cr_assert_eq(pthread_create(&th[i], NULL, race, &r[i]), 0);
	}
	for (uint32_t i = 0; i < PUB_RACERS; i++) {
		pthread_join(th[i], NULL);
		cr_expect_eq(r[i].failure[0], '\0', "racer %u: %s", i, r[i].failure);
	}
	drained(a);
	kvp_pool *b = pool_at(url, NULL);
	kvp_tenant *tb = tenant_in(b, "t", "model=m,block=8,sinks=4");
	for (uint32_t p = 0; p < 3; p++) {
		uint32_t cached;
		kvp_seq *s;
		cr_assert_eq(kvp_seq_open_prefix(tb, &shape, RACE_PROMPT, prompts[p], &s, &cached), KVP_OK, "%s",
			     kvp_last_error());
		cr_assert_eq(cached, 116, "prompt %u: %u of its 116 unit tokens on the server", p, cached);
		if (p == 0) /* the later prompts find their shared first units in b's own cache */
			cr_assert_eq(seq_stats(s).remote_hit_tokens, 116);
		kvp_seq_close(s);
	}
	kvp_pool_close(b);
	kvp_pool_close(a);
}
