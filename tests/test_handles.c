/* Sequence handles carry a generation: closed and made-up handles are refused with KVP_EPERM. */
#include <criterion/criterion.h>
#include <string.h>

#include "kvpager.h"
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
