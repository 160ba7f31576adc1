/*
 * Policy rounds under memory pressure from other threads, as a plain program (Criterion cannot start
 * under ThreadSanitizer); one test, ending with "1 passed, 0 failed" (or "0 passed, 1 failed") so
 * tests/run.sh counts it. Run by `make suites`,
 * `make asan` and `make tsan`.
 *
 * THREADS threads decode, one token at a time: append to every layer, attend every layer, kvp_seq_step.
 * Each thread owns one sequence in each of three tenants (streaming, h2o, online TriAttention, all with a
 * codec-encoded cold tier), so calls on a sequence never overlap (the API's rule) while each tenant's
 * sequences belong to every thread. The quotas are small: one thread's append or round relieves its
 * tenant on the sequences other threads are between two calls of (between an attend and its step, say),
 * spilling their oldest blocks or parking them whole. Now and then a thread parks its own sequence, steps
 * it while parked (the round waits) and unparks it, and it reopens its sequences every REOPEN tokens
 * (H2O's budget grows with the stream), or when an append failed after some layers took the token.
 * KVP_ENOMEM is an expected answer to anything but a step on a parked sequence; every other failure, a
 * tenant seen charged past its quota, and every byte or slot not given back at the end count as
 * failures. The run stops at TOKENS tokens a thread or after SECONDS, whichever comes first.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"

#define THREADS 4
#define TENANTS 3
#define TOKENS 1500
#define SECONDS 3.0
#define REOPEN 300
#define PARK_EVERY 41

static const kvp_shape shape = { 2, 4, 2, 16, 10000.0f, KVP_ROPE_HALF };
#define ROW (2 * 16) /* n_kv_heads x head_dim */
#define QROW (4 * 16)

static const char *const specs[TENANTS] = {
	"block=8,sinks=2,window=8,quota=80KiB,k=turboquant(bits=4),v=fp16,policy=streaming(sinks=2,window=30)",
	"block=8,sinks=2,window=8,quota=96KiB,k=turboquant(bits=3),v=turboquant(bits=4),"
	"policy=h2o(heavy=0.2,recent=0.2)",
	"block=32,sinks=2,window=32,quota=160KiB,k=kivi(bits=2),v=turboquant(bits=3),"
	"policy=triattention(budget=80,every=16,stats=online,offsets=4)",
};

static kvp_pool *pool;
static kvp_tenant *tenants[TENANTS];
static _Atomic unsigned failures;
static double deadline;
enum { SEEN_STEP, SEEN_PARKED_STEP, SEEN_SPILLED, SEEN_ENOMEM, SEEN_KINDS };
static _Atomic unsigned seen[SEEN_KINDS];

struct owned {
	kvp_seq *seq;
	int32_t next_pos;
	int tenant;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fail(const char *what, int tenant, kvp_status st)
{
	fprintf(stderr, "policy stress: %s on tenant %d: %s (%s)\n", what, tenant, kvp_strerror(st), kvp_last_error());
	atomic_fetch_add(&failures, 1);
}

/* KVP_ENOMEM is pressure's answer when nothing is left to spill; anything else but OK is a failure. */
static int fine(kvp_status st, const char *what, int tenant)
{
	if (st == KVP_ENOMEM)
		atomic_fetch_add(&seen[SEEN_ENOMEM], 1);
	else if (st != KVP_OK)
		fail(what, tenant, st);
	return st == KVP_OK;
}

static void reopen(struct owned *o)
{
	kvp_seq_close(o->seq);
	o->seq = NULL;
	o->next_pos = 0;
	fine(kvp_seq_open(tenants[o->tenant], &shape, &o->seq), "open", o->tenant);
}

/* Spilled bytes of a sequence the thread left resident after its last call: memory pressure put them
 * there, most often another thread's. */
static void note_spilled(const struct owned *o)
{
	const struct kvp_tenant_obj *t = kvp_tenant_from_handle(tenants[o->tenant]);
	kvp_stats st = { .size = sizeof st };
	if (fine(kvp_seq_stats(o->seq, &st), "stats", o->tenant) && st.bytes_spilled)
		atomic_fetch_add(&seen[SEEN_SPILLED], 1);
	if (atomic_load(&t->used) > t->quota) /* relief included: its records are paid from what it frees */
		fail("charged past its quota", o->tenant, KVP_OK);
}

static void park_step_unpark(struct owned *o)
{
	kvp_status st = kvp_seq_park(o->seq);
	if (!fine(st, "park", o->tenant)) /* KVP_ENOMEM: no room for its table within the quota */
		return;
	if ((st = kvp_seq_step(o->seq)) == KVP_OK)
		atomic_fetch_add(&seen[SEEN_PARKED_STEP], 1);
	else
		fail("step while parked", o->tenant, st);
	fine(kvp_seq_unpark(o->seq), "unpark", o->tenant); /* on KVP_ENOMEM the next token tries again */
}

/* One token through every layer, then the step. */
static void decode_token(struct owned *o, uint64_t *rng)
{
	float k[ROW], v[ROW], q[QROW], out[QROW];
	int32_t pos;
	if (o->next_pos % REOPEN == REOPEN - 1 || !o->seq)
		reopen(o);
	if (o->seq)
		note_spilled(o);
	if (!o->seq || !fine(kvp_seq_unpark(o->seq), "unpark", o->tenant)) /* a no-op unless one found no room */
		return;
	pos = o->next_pos++;
	*rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
	for (uint32_t l = 0; l < shape.n_layers; l++) {
		fixture_fill(k, ROW, *rng + 2 * l, 1);
		fixture_fill(v, ROW, *rng + 2 * l + 1, 1);
		if (fine(kvp_append(o->seq, l, 1, &pos, k, v), "append", o->tenant))
			continue;
		/* the layers now hold different tokens, which a per_head round refuses: the host drops the
		 * request, as one that runs out of memory mid-token would */
		if (l > 0)
			reopen(o);
		return;
	}
	for (uint32_t l = 0; l < shape.n_layers; l++) {
		fixture_fill(q, QROW, *rng + 7 + l, 1);
		if (!fine(kvp_attend(o->seq, l, q, out), "attend", o->tenant))
			return;
		for (int i = 0; i < QROW; i++)
			if (!isfinite(out[i])) {
				fail("attend gave a non-finite output", o->tenant, KVP_OK);
				return;
			}
	}
	if (fine(kvp_seq_step(o->seq), "step", o->tenant))
		atomic_fetch_add(&seen[SEEN_STEP], 1);
	if (pos % PARK_EVERY == PARK_EVERY / 2)
		park_step_unpark(o);
}

static void *worker(void *arg)
{
	struct owned own[TENANTS];
	uint64_t rng = 0x9e3779b97f4a7c15ull * (uintptr_t)arg;
	for (int t = 0; t < TENANTS; t++) {
		own[t] = (struct owned){ NULL, 0, t };
		fine(kvp_seq_open(tenants[t], &shape, &own[t].seq), "open", t);
	}
	for (int i = 0; i < TOKENS && now() < deadline; i++)
		for (int t = 0; t < TENANTS; t++)
			decode_token(&own[t], &rng);
	for (int t = 0; t < TENANTS; t++)
		kvp_seq_close(own[t].seq);
	return NULL;
}

static void check(int ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "policy stress: FAIL %s (%s)\n", what, kvp_last_error());
		atomic_fetch_add(&failures, 1);
	}
}

static unsigned run(const char *base)
{
	char dir[512], path[600], spec[800];
	pthread_t th[THREADS];
	snprintf(dir, sizeof dir, "%s/kvpager-policy-stress-XXXXXX", base);
	if (!mkdtemp(dir)) {
		perror(dir);
		return 1;
	}
	snprintf(path, sizeof path, "%s/stress.spill", dir);
	snprintf(spec, sizeof spec, "spill=%s,spill_max=256MiB", path);
	check(kvp_pool_open(spec, &pool) == KVP_OK, "pool open");
	if (!pool) {
		rmdir(dir);
		return atomic_load(&failures);
	}
	for (int t = 0; t < TENANTS; t++) {
		char name[16];
		snprintf(name, sizeof name, "t%d", t);
		check(kvp_tenant_open(pool, name, specs[t], &tenants[t]) == KVP_OK, "tenant open");
	}
	if (atomic_load(&failures)) {
		kvp_pool_close(pool);
		rmdir(dir);
		return atomic_load(&failures);
	}
	deadline = now() + SECONDS;
	for (uintptr_t t = 0; t < THREADS; t++)
		check(pthread_create(&th[t], NULL, worker, (void *)(t + 1)) == 0, "thread start");
	for (int t = 0; t < THREADS; t++)
		pthread_join(th[t], NULL);
	fprintf(stderr, "policy stress: %u steps, %u on parked sequences, %u tokens found their sequence spilled, %u KVP_ENOMEM\n",
		seen[SEEN_STEP], seen[SEEN_PARKED_STEP], seen[SEEN_SPILLED], seen[SEEN_ENOMEM]);
	check(atomic_load(&seen[SEEN_STEP]) >= 100, "steps ran");
	check(atomic_load(&seen[SEEN_PARKED_STEP]) > 0, "steps ran on parked sequences");
	check(atomic_load(&seen[SEEN_SPILLED]) > 0, "pressure spilled sequences between their calls");
	for (int t = 0; t < TENANTS; t++) {
		kvp_stats st = { .size = sizeof st };
		check(kvp_tenant_stats(tenants[t], &st) == KVP_OK, "tenant stats");
		check(st.bytes_exact + st.bytes_compressed + st.bytes_meta + st.bytes_spilled == 0,
		      "tenant bytes back to zero");
		check(st.tokens_retained + st.tokens_appended == 0, "tenant tokens back to zero");
	}
	check(kvp_spill_pages_used(pool) == 0, "every spill slot is free");
	kvp_pool_close(pool);
	check(access(path, F_OK) != 0, "the spill file is removed");
	check(rmdir(dir) == 0, "the directory is empty");
	return atomic_load(&failures);
}

int main(void)
{
	const char *tmp = getenv("TMPDIR");
	unsigned failed = run(tmp && *tmp ? tmp : "/tmp");
	/* one test: the failures, named above, are counted apart from the tests' line run.sh reads */
	if (failed)
		printf("policy stress: %u failures (above)\n", failed);
	printf("%u passed, %u failed\n", failed ? 0u : 1u, failed ? 1u : 0u);
	return failed != 0;
}
