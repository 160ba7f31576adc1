/*
 * Many threads, two tenants, one spill device: appends, attention, forks, parks, unparks and closes on
 * random sequences, ending with every byte and every spill slot accounted for. Shared by test_stress.c
 * (Criterion, run by `make suites` and `make asan`) and stress_check.c (a plain program, because
 * Criterion cannot start under ThreadSanitizer; run by `make tsan`).
 *
 * Each slot holds one sequence and a mutex: calls on one sequence never overlap (the API's rule), while
 * forks put siblings that share blocks into slots other threads then work on. Tenant "b" has a quota its
 * sequences outgrow, so memory pressure spills blocks of idle sequences (and parks those with nothing left
 * to spill alone) under other threads' feet, and calls on them bring them back, steps of its policy all
 * of them; KVP_ENOMEM is then an expected answer, KVP_EINVAL too for host-parked ones.
 * Tenant "a" keeps a codec-encoded cold tier, so cold blocks are spilled and shared too, under a quota
 * tight enough that, with every other sequence parked or busy, a caller's own cold blocks are spilled one
 * by one and attention reads them back (with the next layer prefetched) while other threads park.
 */
#ifndef KVP_TEST_STRESS_H
#define KVP_TEST_STRESS_H

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "pager_fixture.h"

#define TENANTS 2
#define PER_TENANT 32
#define SLOTS (TENANTS * PER_TENANT)
#define THREADS 4
#define OPS 2500

static const kvp_shape shape = { 2, 4, 2, 16, 10000.0f, KVP_ROPE_HALF };

struct slot {
	pthread_mutex_t lock;
	kvp_seq *seq;
	int32_t next_pos;
	int tenant;
};

static kvp_pool *pool;
static kvp_tenant *tenants[TENANTS];
static struct slot slots[SLOTS];
static _Atomic unsigned failures;
enum { DONE_APPEND, DONE_ATTEND, DONE_FORK, DONE_PARK, DONE_UNPARK, DONE_KINDS };
static _Atomic unsigned done[DONE_KINDS]; /* calls that did their work (not refused as parked) */

static void fail(const char *what, kvp_status st)
{
	fprintf(stderr, "stress: %s: %s (%s)\n", what, kvp_strerror(st), kvp_last_error());
	atomic_fetch_add(&failures, 1);
}

static void op_append(struct slot *s, uint64_t *rng)
{
	float k[3 * 2 * 16], v[3 * 2 * 16];
	int32_t pos[3];
	uint32_t n = 1 + (uint32_t)(*rng % 3);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = s->next_pos + (int32_t)i;
	for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
		k[i] = fixture_uniform(rng);
		v[i] = fixture_uniform(rng);
	}
	for (uint32_t l = 0; l < shape.n_layers; l++) {
		kvp_status st = kvp_append(s->seq, l, n, pos, k, v);
		if (st != KVP_OK && st != KVP_EINVAL && st != KVP_ENOMEM)
			fail("append", st);
		if (st != KVP_OK)
			return;
	}
	s->next_pos += (int32_t)n;
	atomic_fetch_add(&done[DONE_APPEND], 1);
}

static void op_attend(struct slot *s, uint64_t *rng)
{
	float q[4 * 16], out[4 * 16];
	for (size_t i = 0; i < sizeof q / sizeof q[0]; i++)
		q[i] = fixture_uniform(rng);
	kvp_status st = kvp_attend(s->seq, (uint32_t)(*rng % shape.n_layers), q, out);
	if (st != KVP_OK && st != KVP_EINVAL && st != KVP_ENOMEM)
		fail("attend", st);
	if (st == KVP_OK && (st = kvp_seq_step(s->seq)) != KVP_OK && st != KVP_ENOMEM)
		fail("step", st);
	if (st == KVP_OK)
		atomic_fetch_add(&done[DONE_ATTEND], 1);
}

/* Forks s into another slot of the same tenant, replacing what was there. */
static void op_fork(struct slot *s, uint64_t *rng)
{
	struct slot *d = &slots[s->tenant * PER_TENANT + (int)((*rng >> 8) % PER_TENANT)];
	kvp_seq *child;
	kvp_status st;
	if (d == s || pthread_mutex_trylock(&d->lock) != 0)
		return;
	st = kvp_seq_fork(s->seq, &child);
	if (st == KVP_OK) {
		kvp_seq_close(d->seq);
		d->seq = child;
		d->next_pos = s->next_pos;
		atomic_fetch_add(&done[DONE_FORK], 1);
	} else if (st != KVP_EINVAL && st != KVP_ENOMEM) {
		fail("fork", st);
	}
	pthread_mutex_unlock(&d->lock);
}

static void op_reopen(struct slot *s)
{
	kvp_status st;
	kvp_seq_close(s->seq);
	s->seq = NULL;
	s->next_pos = 0;
	if ((st = kvp_seq_open(tenants[s->tenant], &shape, &s->seq)) != KVP_OK && st != KVP_ENOMEM)
		fail("open", st);
}

static void *worker(void *arg)
{
	uint64_t rng = 0x9e3779b97f4a7c15ull * (uintptr_t)arg + 17;
	for (int i = 0; i < OPS; i++) {
		struct slot *s;
		uint64_t pick;
		fixture_uniform(&rng); /* advances rng */
		s = &slots[(rng >> 20) % SLOTS];
		pick = (rng >> 40) % 100;
		kvp_status st;
		pthread_mutex_lock(&s->lock);
		if (!s->seq) /* its last reopen found the tenant full */
			op_reopen(s);
		if (!s->seq)
			;
		else if (pick < 40)
			op_append(s, &rng);
		else if (pick < 60)
			op_attend(s, &rng);
		else if (pick < 70)
			op_fork(s, &rng);
		else if (pick < 82) /* KVP_ENOMEM: the quota has no room for the records it would not pay for */
			(st = kvp_seq_park(s->seq)) == KVP_OK ? (void)atomic_fetch_add(&done[DONE_PARK], 1)
			: st != KVP_ENOMEM			? fail("park", st)
								: (void)0;
		else if (pick < 96)
			(st = kvp_seq_unpark(s->seq)) == KVP_OK ? (void)atomic_fetch_add(&done[DONE_UNPARK], 1)
			: st != KVP_ENOMEM			  ? fail("unpark", st)
								  : (void)0;
		else
			op_reopen(s);
		pthread_mutex_unlock(&s->lock);
	}
	return NULL;
}

/* Counts a failed check and says which. */
static void check(int ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "stress: FAIL %s (%s)\n", what, kvp_last_error());
		atomic_fetch_add(&failures, 1);
	}
}

/*
 * Then two threads call one sequence with no lock between them, breaking the API's rule: a call that
 * overlaps the other's is refused with KVP_EBUSY and does nothing, so the sequence holds exactly the
 * tokens of the appends that returned KVP_OK, and nothing else is ever returned.
 */
#define OVERLAP_CALLS 3000

struct overlap {
	kvp_seq *seq;
	unsigned ok, busy;
};

static void *overlap_appender(void *arg)
{
	struct overlap *o = arg;
	float k[2 * 16] = { 0.25f }, v[2 * 16] = { 0.5f };
	for (int i = 0; i < OVERLAP_CALLS; i++) {
		int32_t pos = (int32_t)o->ok;
		kvp_status st = kvp_append(o->seq, 0, 1, &pos, k, v);
		st == KVP_OK ? (void)o->ok++ : st == KVP_EBUSY ? (void)o->busy++ : fail("overlapping append", st);
	}
	return NULL;
}

static void *overlap_reader(void *arg)
{
	struct overlap *o = arg;
	float q[4 * 16] = { 1.0f }, out[4 * 16];
	kvp_stats st_out = { .size = sizeof st_out };
	for (int i = 0; i < OVERLAP_CALLS; i++) {
		kvp_status st = i & 1 ? kvp_attend(o->seq, 0, q, out) : kvp_seq_stats(o->seq, &st_out);
		st == KVP_OK ? (void)o->ok++ : st == KVP_EBUSY ? (void)o->busy++ : fail("overlapping read", st);
	}
	return NULL;
}

static void overlap_run(void)
{
	struct overlap w = { 0 }, r = { 0 };
	kvp_stats st = { .size = sizeof st };
	pthread_t a, b;
	int started_a, started_b;
	kvp_tenant *t;
	check(kvp_tenant_open(pool, "overlap", "block=8,window=8,k=turboquant(bits=4),v=fp16", &t) == KVP_OK, "overlap tenant");
	check(kvp_seq_open(t, &shape, &w.seq) == KVP_OK, "overlap sequence");
	r.seq = w.seq;
	started_a = pthread_create(&a, NULL, overlap_appender, &w) == 0;
	started_b = pthread_create(&b, NULL, overlap_reader, &r) == 0;
	check(started_a && started_b, "overlap threads");
	if (started_a)
		pthread_join(a, NULL);
	if (started_b)
		pthread_join(b, NULL);
	if (!started_a || !started_b) {
		kvp_tenant_close(t);
		return;
	}
	check(kvp_seq_stats(w.seq, &st) == KVP_OK, "overlap stats");
	check(st.tokens_appended == (uint64_t)w.ok * shape.n_kv_heads, "the sequence holds the appends that returned KVP_OK");
	check(w.ok + w.busy == OVERLAP_CALLS && r.ok + r.busy == OVERLAP_CALLS, "every overlapping call is OK or KVP_EBUSY");
	printf("stress: overlapping calls on one sequence: %u of %u appends and %u of %u reads refused\n", w.busy,
	       OVERLAP_CALLS, r.busy, OVERLAP_CALLS);
	kvp_tenant_close(t);
}

/* a: a cold tier of codec-encoded blocks, spilled block by block under its quota; b: a quota its sequences outgrow, and a token policy that
 * compacts blocks (shared with forks) at every step. */
static const char *const specs[TENANTS] = {
	"block=8,sinks=2,window=8,k=turboquant(bits=4),v=fp16,quota=112KiB",
	"block=8,sinks=2,window=8,quota=128KiB,policy=streaming(sinks=2,window=8)",
};

/* Runs the whole stress in a fresh directory under base; returns the number of failed checks. */
static unsigned stress_run(const char *base)
{
	char dir[512], path[600], spec[800];
	pthread_t th[THREADS];
	snprintf(dir, sizeof dir, "%s/kvpager-stress-XXXXXX", base);
	if (!mkdtemp(dir)) {
		perror(dir);
		return 1;
	}
	snprintf(path, sizeof path, "%s/stress.spill", dir);
	snprintf(spec, sizeof spec, "spill=%s,spill_max=256MiB", path);
	check(kvp_pool_open(spec, &pool) == KVP_OK, "pool open");
	if (!pool)
		return atomic_load(&failures);
	for (int t = 0; t < TENANTS; t++)
		check(kvp_tenant_open(pool, t ? "b" : "a", specs[t], &tenants[t]) == KVP_OK, "tenant open");
	for (int i = 0; i < SLOTS; i++) {
		pthread_mutex_init(&slots[i].lock, NULL);
		slots[i].tenant = i / PER_TENANT;
		check(kvp_seq_open(tenants[slots[i].tenant], &shape, &slots[i].seq) == KVP_OK, "sequence open");
	}
	for (uintptr_t t = 0; t < THREADS; t++)
		check(pthread_create(&th[t], NULL, worker, (void *)(t + 1)) == 0, "thread start");
	for (int t = 0; t < THREADS; t++)
		pthread_join(th[t], NULL);
	for (int k = 0; k < DONE_KINDS; k++)
		check(atomic_load(&done[k]) > OPS / 50, "every kind of call ran");
	check(kvp_spill_pages_used(pool) > 0, "the run ended with parked sequences");
	for (int i = 0; i < SLOTS; i++) {
		kvp_seq_close(slots[i].seq);
		pthread_mutex_destroy(&slots[i].lock);
	}
	for (int t = 0; t < TENANTS; t++) {
		kvp_stats st = { .size = sizeof st };
		check(kvp_tenant_stats(tenants[t], &st) == KVP_OK, "tenant stats");
		check(st.bytes_exact + st.bytes_meta + st.bytes_spilled == 0, "tenant bytes back to zero");
		check(st.tokens_retained + st.tokens_appended == 0, "tenant tokens back to zero");
	}
	check(kvp_spill_pages_used(pool) == 0, "every spill slot is free");
	overlap_run();
	kvp_pool_close(pool);
	check(access(path, F_OK) != 0, "the spill file is removed");
	check(rmdir(dir) == 0, "the directory is empty");
	return atomic_load(&failures);
}

#endif
