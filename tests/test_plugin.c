/*
 * The dlopen entry, used the way a serving engine uses it: open build/libkvpager.so.1 by path, ask for
 * the table, and run a prefill and a decode through the table alone.
 */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "kvpager.h"
#include "pager_fixture.h"

typedef const kvp_plugin_v1 *(*entry_fn)(uint32_t);

static void *library;

static void library_path(char *buf, size_t n)
{
	const char *build = getenv("KVP_TEST_BUILD");
	snprintf(buf, n, "%s/libkvpager.so.1", build ? build : "build");
}

static const kvp_plugin_v1 *open_table(uint32_t major)
{
	char path[512];
	entry_fn entry;
	library_path(path, sizeof path);
	library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	cr_assert_not_null(library, "dlopen %s: %s", path, dlerror());
	*(void **)&entry = dlsym(library, "kvp_plugin");
	cr_assert_not_null(entry, "kvp_plugin is not exported");
	return entry(major);
}

Test(plugin, serves_major_1_with_a_full_table)
{
	const kvp_plugin_v1 *api = open_table(KVP_ABI_MAJOR);
	cr_assert_not_null(api);
	cr_assert_eq(api->abi_major, 1);
	cr_assert_geq(api->size, sizeof(kvp_plugin_v1));
	for (const void *const *f = (const void *const *)&api->strerror;
	     (const char *)f < (const char *)api + sizeof *api; f++)
		cr_assert_not_null(*f, "a null entry at offset %zu", (size_t)((const char *)f - (const char *)api));
	dlclose(library);
}

Test(plugin, refuses_an_unknown_major)
{
	char path[512];
	entry_fn entry;
	const char *(*last_error)(void);
	library_path(path, sizeof path);
	library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	cr_assert_not_null(library, "%s", dlerror());
	*(void **)&entry = dlsym(library, "kvp_plugin");
	*(void **)&last_error = dlsym(library, "kvp_last_error");
	cr_assert_null(entry(2));
	cr_assert_null(entry(0));
	cr_assert(strstr(last_error(), "major 0 is not served"), "%s", last_error());
	dlclose(library);
}

Test(plugin, exports_only_kvp_symbols)
{
	char path[512], cmd[600], line[512];
	int n = 0;
	FILE *nm;
	library_path(path, sizeof path);
	snprintf(cmd, sizeof cmd, "nm -D --defined-only %s", path);
	nm = popen(cmd, "r");
	cr_assert_not_null(nm);
	while (fgets(line, sizeof line, nm)) {
		char type, name[400];
		if (sscanf(line, "%*s %c %399s", &type, name) != 2 || type == 'A')
			continue;
		cr_assert(!strncmp(name, "kvp_", 4), "exported: %s", name);
		n++;
	}
	cr_assert_eq(pclose(nm), 0, "nm failed");
	cr_assert_geq(n, 28, "only %d of the 28 public calls exported", n);
	library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	cr_assert_null(dlsym(library, "kvp_fail"), "internal functions stay hidden");
	dlclose(library);
}

Test(plugin, runs_prefill_and_decode_through_the_table)
{
	const kvp_plugin_v1 *api = open_table(KVP_ABI_MAJOR);
	const kvp_shape sh = { 2, 4, 2, 16, 10000.0f, KVP_ROPE_INTERLEAVED };
	enum { N = 40, ROW = 2 * 16 };
	static float k[N * ROW], v[N * ROW], q[4 * 16], out[4 * 16], sk[N * 16], sv[N * 16];
	double ref[16];
	int32_t pos[N];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *s;
	kvp_stats st = { .size = sizeof st };

	fixture_fill(k, N * ROW, 1, 1);
	fixture_fill(v, N * ROW, 2, 1);
	fixture_fill(q, 64, 3, 1);
	for (int i = 0; i < N; i++)
		pos[i] = i;
	cr_assert_eq(api->pool_open("mem=64MiB", &pool), KVP_OK, "%s", api->last_error());
	cr_assert_eq(api->tenant_open(pool, "host", "block=16,sinks=4,window=8", &t), KVP_OK, "%s",
		     api->last_error());
	cr_assert_eq(api->seq_open(t, &sh, &s), KVP_OK, "%s", api->last_error());
	for (uint32_t l = 0; l < 2; l++)
		cr_assert_eq(api->append(s, l, N - 1, pos, k, v), KVP_OK, "%s", api->last_error());
	for (uint32_t l = 0; l < 2; l++) {
		cr_assert_eq(api->append(s, l, 1, pos + N - 1, k + (N - 1) * ROW, v + (N - 1) * ROW), KVP_OK);
		cr_assert_eq(api->attend(s, l, q, out), KVP_OK);
	}
	cr_assert_eq(api->seq_step(s), KVP_OK);
	for (int g = 0; g < 2; g++) {
		for (int i = 0; i < N; i++)
			for (int j = 0; j < 16; j++) {
				sk[i * 16 + j] = k[i * ROW + g * 16 + j];
				sv[i * 16 + j] = v[i * ROW + g * 16 + j];
			}
		for (int h = 2 * g; h < 2 * g + 2; h++) {
			fixture_attend(16, N, sk, sv, q + h * 16, ref);
			cr_assert_lt(fixture_rel_error(16, out + h * 16, ref), 1e-5, "head %d", h);
		}
	}
	cr_assert_eq(api->seq_stats(s, &st), KVP_OK);
	cr_assert_eq(st.tokens_retained, 2 * 2 * N);
	cr_assert_eq(api->append(s, 7, 1, pos, k, v), KVP_EINVAL);
	cr_assert(strstr(api->last_error(), "layer 7"), "%s", api->last_error());
	cr_assert_str_eq(api->strerror(KVP_ENOMEM), "out of memory or over quota");
	api->seq_close(s);
	api->pool_close(pool);
	dlclose(library);
}
