/* Pools and tenants: specs, limits, quotas and the all-or-nothing rule for appends. */
#include <criterion/criterion.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"

static const kvp_shape shape = { 2, 4, 2, 16, 10000.0f, KVP_ROPE_HALF };

Test(pool, opens_with_an_empty_spec)
{
	kvp_pool *p = NULL;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_not_null(p);
	kvp_pool_close(p);
	cr_assert_eq(kvp_pool_open(NULL, &p), KVP_OK);
	kvp_pool_close(p);
}

Test(pool, rejects_unknown_keys_and_bad_sizes_by_name)
{
	kvp_pool *p = (kvp_pool *)1;
	cr_assert_eq(kvp_pool_open("mem=4GiB,memory=1", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "unknown key 'memory'"), "%s", kvp_last_error());
	cr_assert_null(p, "a failed open leaves *out NULL");
	cr_assert_eq(kvp_pool_open("mem=lots", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "mem=lots"), "%s", kvp_last_error());
}

Test(pool, spill_needs_both_a_path_and_a_size)
{
	kvp_pool *p;
	cr_assert_eq(kvp_pool_open("spill=/tmp/x.spill", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill_max="), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_open("spill_max=1GiB", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill=PATH"), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_open("spill_buffer=8MiB", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill=PATH"), "%s", kvp_last_error());
}

Test(pool, numa_node_is_placed_or_ignored_with_a_note)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	float k[2 * 16] = { 1 }, v[2 * 16] = { 2 };
	int32_t pos = 0;
	cr_assert_eq(kvp_pool_open("numa=0", &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "", &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK);
	cr_assert_eq(kvp_append(s, 0, 1, &pos, k, v), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(p);
	cr_assert_eq(kvp_pool_open("numa=1000", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "numa=1000"), "%s", kvp_last_error());
}

Test(tenant, names_are_unique_within_a_pool)
{
	kvp_pool *p;
	kvp_tenant *a, *b;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "alice", "", &a), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "alice", "", &b), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "'alice' already exists"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "", "", &b), KVP_EINVAL);
	kvp_tenant_close(a);
	cr_assert_eq(kvp_tenant_open(p, "alice", "", &b), KVP_OK, "a closed tenant's name is free again");
	kvp_pool_close(p);
}

Test(tenant, rejects_bad_specs_by_name)
{
	kvp_pool *p;
	kvp_tenant *t;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "block=0", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "block=0"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "store=int4", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "store=int4"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "quota=1GiB,windw=3", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "windw"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "policy=streaming(sinks=4,windw=3)", &t), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "policy=") && strstr(kvp_last_error(), "windw"), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "ladder=4:1.0", &t), KVP_EINVAL); /* no gate= to pick levels */
	cr_assert(strstr(kvp_last_error(), "ladder="), "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(p, "a", "block=64,sinks=4,window=128,store=fp16,quota=1MiB", &t), KVP_OK);
	kvp_pool_close(p);
}

Test(tenant, bad_shapes_are_refused)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	kvp_shape bad = shape;
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "", &t), KVP_OK);
	bad.n_heads = 5;
	cr_assert_eq(kvp_seq_open(t, &bad, &s), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not a multiple"), "%s", kvp_last_error());
	bad = shape;
	bad.head_dim = 0;
	cr_assert_eq(kvp_seq_open(t, &bad, &s), KVP_EINVAL);
	bad = shape;
	bad.rope_theta = -1;
	cr_assert_eq(kvp_seq_open(t, &bad, &s), KVP_EINVAL);
	cr_assert_eq(kvp_seq_open(t, NULL, &s), KVP_EINVAL);
	kvp_pool_close(p);
}

/* Appends n tokens to every layer; returns the first failure. */
static kvp_status append_all(kvp_seq *s, int32_t at, uint32_t n, uint64_t seed)
{
	size_t row = (size_t)shape.n_kv_heads * shape.head_dim;
	float *k = malloc(n * row * sizeof *k), *v = malloc(n * row * sizeof *v);
	int32_t *pos = malloc(n * sizeof *pos);
	kvp_status st = KVP_OK;
	for (uint32_t i = 0; i < n; i++)
		pos[i] = at + (int32_t)i;
	for (uint32_t l = 0; l < shape.n_layers && st == KVP_OK; l++) {
		fixture_fill(k, n * row, seed + 2 * l, 1);
		fixture_fill(v, n * row, seed + 2 * l + 1, 1);
		st = kvp_append(s, l, n, pos, k, v);
	}
	free(k);
	free(v);
	free(pos);
	return st;
}

static void snapshot(kvp_seq *s, float *k, float *v, int32_t *pos, uint32_t *n)
{
	cr_assert_eq(kvp_gather(s, 1, 1, 4096, pos, k, v, n), KVP_OK, "%s", kvp_last_error());
}

Test(quota, append_over_the_tenant_quota_fails_and_changes_nothing)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s;
	kvp_stats before = { .size = sizeof before }, after = { .size = sizeof after };
	static float k0[4096 * 16], v0[4096 * 16], k1[4096 * 16], v1[4096 * 16];
	static int32_t p0[4096], p1[4096];
	uint32_t n0, n1;
	kvp_status st = KVP_OK;
	int32_t at = 0;

	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "quota=256KiB,block=16,sinks=4", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK);
	while ((st = append_all(s, at, 7, (uint64_t)at)) == KVP_OK)
		at += 7;
	cr_assert_eq(st, KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	/* Layer 0 may have taken the last batch before layer 1 failed: bring them level first. */
	cr_assert_eq(kvp_gather(s, 0, 0, 4096, NULL, NULL, NULL, &n0), KVP_OK);
	cr_assert_eq(kvp_gather(s, 1, 0, 4096, NULL, NULL, NULL, &n1), KVP_OK);
	cr_assert(n0 >= n1);
	snapshot(s, k0, v0, p0, &n0);
	cr_assert_eq(kvp_tenant_stats(t, &before), KVP_OK);
	cr_assert_eq(append_all(s, at, 200, 99) == KVP_OK, 0);
	snapshot(s, k1, v1, p1, &n1);
	cr_assert_eq(kvp_tenant_stats(t, &after), KVP_OK);
	cr_assert_eq(n0, n1);
	cr_assert(!memcmp(p0, p1, n0 * sizeof *p0));
	cr_assert(!memcmp(k0, k1, n0 * 16 * sizeof *k0));
	cr_assert(!memcmp(v0, v1, n0 * 16 * sizeof *v0));
	cr_assert(!memcmp(&before, &after, sizeof before), "a failed append must not change any counter");
	kvp_pool_close(p);
}

Test(quota, pool_limit_binds_across_tenants)
{
	kvp_pool *p;
	kvp_tenant *a, *b;
	kvp_seq *sa, *sb;
	kvp_stats st = { .size = sizeof st };
	int32_t at = 0;
	cr_assert_eq(kvp_pool_open("mem=512KiB", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "", &a), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "b", "", &b), KVP_OK);
	cr_assert_eq(kvp_seq_open(a, &shape, &sa), KVP_OK);
	cr_assert_eq(kvp_seq_open(b, &shape, &sb), KVP_OK);
	while (append_all(sa, at, 64, 1) == KVP_OK)
		at += 64;
	cr_assert(strstr(kvp_last_error(), "pool"), "%s", kvp_last_error());
	cr_assert_eq(append_all(sb, 0, 64, 2), KVP_ENOMEM, "b cannot use what a holds");
	kvp_seq_close(sa);
	cr_assert_eq(append_all(sb, 0, 64, 2), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_stats(a, &st), KVP_OK);
	cr_assert_eq(st.bytes_exact + st.bytes_meta + st.bytes_compressed, 0, "a's bytes all came back");
	kvp_pool_close(p);
}

Test(quota, tenant_stats_return_to_zero_after_close)
{
	kvp_pool *p;
	kvp_tenant *t;
	kvp_seq *s, *f;
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(kvp_pool_open("", &p), KVP_OK);
	cr_assert_eq(kvp_tenant_open(p, "a", "block=8,sinks=2", &t), KVP_OK);
	cr_assert_eq(kvp_seq_open(t, &shape, &s), KVP_OK);
	cr_assert_eq(append_all(s, 0, 50, 3), KVP_OK);
	cr_assert_eq(kvp_seq_fork(s, &f), KVP_OK);
	cr_assert_eq(append_all(f, 50, 3, 4), KVP_OK);
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK);
	cr_assert(st.bytes_exact > 0);
	kvp_seq_close(s);
	kvp_seq_close(f);
	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK);
	cr_assert_eq(st.bytes_exact, 0);
	cr_assert_eq(st.bytes_meta, 0);
	cr_assert_eq(st.tokens_retained, 0);
	cr_assert_eq(st.bytes_dense_fp16, 0);
	kvp_pool_close(p);
}
