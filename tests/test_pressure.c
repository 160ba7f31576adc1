/* Memory pressure: a charge over the tenant's quota or the pool's limit first parks the tenant's least
 * recently used idle sequence; such a sequence comes back by itself on its next call. */
#include <criterion/criterion.h>
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

Test(pressure, an_append_over_quota_parks_the_least_recently_used_idle_sequence)
{
	float before[PARK_LAYERS * PARK_OUT];
	kvp_seq *a, *b, *c;
	three_sequences(&a, &b, &c, before);
	cr_assert_eq(park_tenant_stats().bytes_spilled, 0);
	park_fill(c, 100, 100, 4); /* would pass the quota by ~40 KB */
	cr_assert_gt(spilled(b), 0, "b was the least recently used");
	cr_assert_eq(spilled(a), 0);
	cr_assert_eq(spilled(c), 0);
	cr_assert_eq(park_tenant_stats().bytes_spilled, spilled(b));
	park_close();
}

Test(pressure, a_pressure_parked_sequence_comes_back_on_its_next_call_bit_identical)
{
	float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *a, *b, *c;
	three_sequences(&a, &b, &c, before);
	park_fill(c, 100, 100, 4);
	cr_assert_gt(spilled(b), 0);
	park_attend(b, after); /* brings b back, parking the now least recently used a to make room */
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	cr_assert_eq(spilled(b), 0);
	cr_assert_gt(spilled(a), 0, "a was idle longest when b came back");
	park_fill(b, 100, 1, 5); /* appends work on it too */
	park_close();
}

Test(pressure, the_host_parking_a_pressure_parked_sequence_makes_it_stay_parked)
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
