/* Sequence handles carry a generation: closed and made-up handles are refused with KVP_EPERM. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "park_fixture.h"

TestSuite(handles, .fini = spill_fixture_fini);

static void assert_refused(kvp_seq *h)
{
	float x[PARK_ROW] = { 0 }, out[PARK_OUT];
	int32_t pos = 0;
	uint32_t n;
	kvp_seq *f;
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_append(h, 0, 1, &pos, x, x), KVP_EPERM);
	cr_assert(strstr(kvp_last_error(), "not an open sequence"), "%s", kvp_last_error());
	cr_assert_eq(kvp_attend(h, 0, x, out), KVP_EPERM);
	cr_assert_eq(kvp_gather(h, 0, 0, 0, NULL, NULL, NULL, &n), KVP_EPERM);
	cr_assert_eq(kvp_seq_fork(h, &f), KVP_EPERM);
	cr_assert_eq(kvp_seq_stats(h, &st), KVP_EPERM);
	cr_assert_eq(kvp_seq_step(h), KVP_EPERM);
	cr_assert_eq(kvp_seq_park(h), KVP_EPERM);
	cr_assert_eq(kvp_seq_unpark(h), KVP_EPERM);
	kvp_seq_close(h); /* a no-op */
}

Test(handles, a_closed_sequence_handle_is_refused_with_eperm)
{
	kvp_seq *s;
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 10, 1);
	kvp_seq_close(s);
	assert_refused(s);
	park_close();
}

Test(handles, a_stale_handle_never_reaches_the_sequence_that_reuses_its_slot)
{
	float out[PARK_LAYERS * PARK_OUT];
	kvp_seq *old, *fresh;
	kvp_stats st = { .size = sizeof st };
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &old), KVP_OK);
	kvp_seq_close(old);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &fresh), KVP_OK);
	cr_assert_neq(old, fresh, "same slot, new generation");
	park_fill(fresh, 0, 5, 2);
	assert_refused(old);
	cr_assert_eq(kvp_seq_stats(fresh, &st), KVP_OK, "closing the stale handle did not close the new one");
	cr_assert_eq(st.tokens_appended, 5 * PARK_KV * PARK_LAYERS);
	park_attend(fresh, out);
	park_close();
}

Test(handles, sequences_closed_with_their_tenant_or_pool_are_refused)
{
	kvp_seq *a, *b;
	kvp_tenant *other;
	park_open("1MiB", "");
	cr_assert_eq(kvp_tenant_open(pool, "other", "", &other), KVP_OK);
	cr_assert_eq(kvp_seq_open(other, &park_shape, &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &b), KVP_OK);
	kvp_tenant_close(other);
	assert_refused(a);
	park_close();
	assert_refused(b);
}

Test(handles, values_that_never_were_handles_are_refused_without_being_read)
{
	static int not_a_sequence[64];
	assert_refused((kvp_seq *)(void *)not_a_sequence); /* a real address, but no handle */
	assert_refused((kvp_seq *)(uintptr_t)0x12345);
	assert_refused((kvp_seq *)(uintptr_t)0x7fffffff00000001ull);
	assert_refused((kvp_seq *)(uintptr_t)~(uintptr_t)0);
	cr_assert_eq(kvp_seq_park(NULL), KVP_EINVAL, "NULL stays EINVAL");
}

/* ---- pools and tenants carry generations too ---- */

static void assert_tenant_refused(kvp_tenant *t)
{
	kvp_stats st = { .size = sizeof st };
	kvp_seq *s = NULL;
	cr_assert_eq(kvp_seq_open(t, &park_shape, &s), KVP_EPERM);
	cr_assert(strstr(kvp_last_error(), "not an open tenant"), "%s", kvp_last_error());
	cr_assert_null(s);
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_EPERM);
	kvp_tenant_close(t); /* a no-op */
}

static void assert_pool_refused(kvp_pool *p)
{
	kvp_tenant *t = NULL;
	cr_assert_eq(kvp_tenant_open(p, "u", "", &t), KVP_EPERM);
	cr_assert(strstr(kvp_last_error(), "not an open pool"), "%s", kvp_last_error());
	cr_assert_null(t);
	kvp_pool_close(p); /* a no-op */
}

/* The tenant handle is alive and its sequences work: append, attend, stats. */
static void assert_tenant_works(kvp_tenant *t, uint64_t seed)
{
	float out[PARK_LAYERS * PARK_OUT];
	kvp_stats st = { .size = sizeof st };
	kvp_seq *s;
	cr_assert_eq(kvp_seq_open(t, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	park_fill(s, 0, 70, seed);
	park_attend(s, out);
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK, "%s", kvp_last_error());
	cr_assert_geq(st.tokens_appended, 70 * PARK_KV * PARK_LAYERS);
	kvp_seq_close(s);
}

Test(handles, a_closed_tenant_is_refused_and_closing_it_again_is_a_no_op)
{
	kvp_tenant *gone;
	park_open("1MiB", "");
	cr_assert_eq(kvp_tenant_open(pool, "gone", "", &gone), KVP_OK);
	kvp_tenant_close(gone);
	assert_tenant_refused(gone);
	assert_tenant_works(tenant, 1);
	park_close();
}

Test(handles, a_stale_tenant_handle_never_reaches_the_tenant_that_reuses_its_memory_and_arena)
{
	kvp_tenant *old, *fresh;
	struct kvp_tenant_obj *inside;
	unsigned arena;
	park_open("1MiB", "");
	cr_assert_eq(kvp_tenant_open(pool, "a", "", &old), KVP_OK);
	inside = kvp_tenant_from_handle(old);
	arena = inside->arena;
	kvp_tenant_close(old);
	cr_assert_eq(kvp_tenant_open(pool, "b", "", &fresh), KVP_OK);
	/* what made the stale handle dangerous: the next tenant gets the freed arena index (and, from most
	 * allocators, the freed memory: not from ASan's, which keeps it in quarantine) */
	cr_assert_eq(kvp_tenant_from_handle(fresh)->arena, arena);
	cr_log_info("the new tenant %s the old one's memory",
		    kvp_tenant_from_handle(fresh) == inside ? "reuses" : "does not reuse");
	cr_assert_neq(old, fresh, "same slot, new generation");
	assert_tenant_refused(old);
	assert_tenant_works(fresh, 2);
	kvp_tenant_close(fresh);
	park_close();
}

Test(handles, a_stale_pool_handle_never_closes_the_pool_that_reuses_its_memory)
{
	kvp_pool *old, *fresh;
	kvp_tenant *t;
	cr_assert_eq(kvp_pool_open("", &old), KVP_OK);
	kvp_pool_close(old);
	cr_assert_eq(kvp_pool_open("", &fresh), KVP_OK);
	cr_assert_neq(old, fresh);
	assert_pool_refused(old);
	cr_assert_eq(kvp_tenant_open(fresh, "t", "", &t), KVP_OK, "%s", kvp_last_error());
	assert_tenant_works(t, 3);
	kvp_pool_close(fresh);
	assert_pool_refused(fresh);
	assert_tenant_refused(t);
}

Test(handles, a_handle_of_one_kind_is_refused_as_another)
{
	kvp_seq *s;
	park_open("1MiB", "");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	assert_tenant_refused((kvp_tenant *)(void *)s);
	assert_tenant_refused((kvp_tenant *)(void *)pool);
	assert_pool_refused((kvp_pool *)(void *)tenant);
	assert_pool_refused((kvp_pool *)(void *)s);
	assert_refused((kvp_seq *)(void *)tenant);
	assert_refused((kvp_seq *)(void *)pool);
	park_fill(s, 0, 5, 4); /* none of those closes closed anything */
	assert_tenant_works(tenant, 5);
	park_close();
}

Test(handles, pool_and_tenant_values_that_never_were_handles_are_refused_without_being_read)
{
	static int not_a_handle[64];
	const uintptr_t made_up[] = { (uintptr_t)not_a_handle, 0x12345, (uintptr_t)0x7fffffff00000001ull,
				      ~(uintptr_t)0, 2 };
	kvp_stats st = { .size = sizeof st };
	for (size_t i = 0; i < sizeof made_up / sizeof made_up[0]; i++) {
		assert_tenant_refused((kvp_tenant *)made_up[i]);
		assert_pool_refused((kvp_pool *)made_up[i]);
	}
	cr_assert_eq(kvp_tenant_stats(NULL, &st), KVP_EINVAL, "NULL stays EINVAL");
	cr_assert_eq(kvp_seq_open(NULL, &park_shape, &(kvp_seq *){ NULL }), KVP_EINVAL);
	cr_assert_eq(kvp_tenant_open(NULL, "t", "", &(kvp_tenant *){ NULL }), KVP_EINVAL);
	kvp_tenant_close(NULL);
	kvp_pool_close(NULL);
}

/* ---- handles from many threads ---- */

#define RACERS 4

struct close_race {
	pthread_barrier_t start;
	kvp_tenant *t;
};

static void *close_racer(void *arg)
{
	struct close_race *r = arg;
	pthread_barrier_wait(&r->start);
	kvp_tenant_close(r->t);
	return NULL;
}

Test(handles, racing_closes_of_one_tenant_destroy_it_once)
{
	pthread_t th[RACERS];
	struct close_race r;
	park_open("1MiB", "");
	for (int round = 0; round < 20; round++) {
		kvp_seq *s;
		cr_assert_eq(kvp_tenant_open(pool, "raced", "", &r.t), KVP_OK, "%s", kvp_last_error());
		cr_assert_eq(kvp_seq_open(r.t, &park_shape, &s), KVP_OK);
		park_fill(s, 0, 10, (uint64_t)round);
		pthread_barrier_init(&r.start, NULL, RACERS);
		for (int i = 0; i < RACERS; i++)
			cr_assert_eq(pthread_create(&th[i], NULL, close_racer, &r), 0);
		for (int i = 0; i < RACERS; i++)
			pthread_join(th[i], NULL);
		pthread_barrier_destroy(&r.start);
		assert_tenant_refused(r.t);
		assert_refused(s);
	}
	assert_tenant_works(tenant, 6);
	park_close();
}

struct churn {
	int id;
	int failures;
};

/* Opens, uses and closes tenants of its own, checking each stale handle is refused while the other
 * threads' handles come and go in the same table. */
static void *churner(void *arg)
{
	struct churn *c = arg;
	float k[4 * PARK_ROW] = { 0 }, q[PARK_OUT] = { 0 }, out[PARK_OUT];
	int32_t pos[4] = { 0, 1, 2, 3 };
	kvp_stats st = { .size = sizeof st };
	for (int n = 0; n < 100; n++) {
		char name[32];
		kvp_tenant *t;
		kvp_seq *s, *none;
		snprintf(name, sizeof name, "churn%d.%d", c->id, n);
		if (kvp_tenant_open(pool, name, "", &t) != KVP_OK || kvp_seq_open(t, &park_shape, &s) != KVP_OK) {
			c->failures++;
			continue;
		}
		c->failures += kvp_append(s, 0, 4, pos, k, k) != KVP_OK;
		c->failures += kvp_attend(s, 0, q, out) != KVP_OK;
		c->failures += kvp_tenant_stats(t, &st) != KVP_OK || st.tokens_appended != 4 * PARK_KV;
		kvp_tenant_close(t);
		c->failures += kvp_tenant_stats(t, &st) != KVP_EPERM;
		c->failures += kvp_seq_open(t, &park_shape, &none) != KVP_EPERM;
		c->failures += kvp_seq_stats(s, &st) != KVP_EPERM;
		kvp_tenant_close(t);
	}
	return NULL;
}

Test(handles, threads_opening_and_closing_tenants_only_ever_reach_their_own)
{
	pthread_t th[RACERS];
	struct churn c[RACERS];
	park_open("1MiB", "");
	for (int i = 0; i < RACERS; i++) {
		c[i] = (struct churn){ .id = i };
		cr_assert_eq(pthread_create(&th[i], NULL, churner, &c[i]), 0);
	}
	for (int i = 0; i < RACERS; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(c[i].failures, 0, "thread %d: %d calls went wrong", i, c[i].failures);
	}
	assert_tenant_works(tenant, 7);
	park_close();
}
