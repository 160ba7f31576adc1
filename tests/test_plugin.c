/*
 * The dlopen entry, used the way a serving engine uses it: open build/libkvpager.so.1 by path, ask for
 * the table, and run a prefill and a decode through the table alone.
 *
 * This binary is such a host: it links neither the library nor any jemalloc (the Makefile links it with
 * Criterion alone), the way a Python process or llama.cpp loads the library. It also runs itself a second
 * time with the system's libjemalloc.so.2 preloaded, the host's own malloc then being a jemalloc other
 * than the library's: pools, quotas, spill and park must work under both, and a pointer handed to the
 * wrong allocator would crash one of the two runs.
 */
#include <criterion/criterion.h>
#include <stddef.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager_fixture.h"
#include "spill_fixture.h"

/* Set in the second run, whose host preloads libjemalloc.so.2. */
#define HOST_JEMALLOC_ENV "KVP_TEST_HOST_JEMALLOC"

TestSuite(plugin, .fini = spill_fixture_fini);

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

Test(plugin, minor_3_serves_prefix_caching_through_the_table)
{
	const kvp_plugin_v1 *api = open_table(KVP_ABI_MAJOR);
	const kvp_shape sh = { 1, 2, 1, 8, 10000.0f, KVP_ROPE_HALF };
	int32_t tokens[12] = { 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 }, pos[12];
	float k[12 * 8], v[12 * 8];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *a, *b;
	uint32_t cached = 99;
	cr_assert_geq(api->abi_minor, 3);
	cr_assert_geq(api->size, offsetof(kvp_plugin_v1, seq_open_prefix) + sizeof api->seq_open_prefix);
	for (int i = 0; i < 12; i++) {
		pos[i] = i;
		for (int j = 0; j < 8; j++)
			k[i * 8 + j] = v[i * 8 + j] = (float)(tokens[i] * 8 + j);
	}
	cr_assert_eq(api->pool_open("", &pool), KVP_OK);
	cr_assert_eq(api->tenant_open(pool, "t", "model=m,block=4,sinks=4", &t), KVP_OK, "%s", api->last_error());
	cr_assert_eq(api->seq_open_prefix(t, &sh, 12, tokens, &a, &cached), KVP_OK, "%s", api->last_error());
	cr_assert_eq(cached, 0);
	cr_assert_eq(api->append(a, 0, 12, pos, k, v), KVP_OK);
	cr_assert_eq(api->seq_open_prefix(t, &sh, 12, tokens, &b, &cached), KVP_OK);
	cr_assert_eq(cached, 8, "the sink and one block: the last unit holds the last token");
	api->pool_close(pool);
	dlclose(library);
}

Test(plugin, minor_4_serves_the_remote_tiers_publication_through_the_table)
{
	const kvp_plugin_v1 *api = open_table(KVP_ABI_MAJOR);
	kvp_remote_stats r = { .size = sizeof r, .queued = 3 };
	kvp_pool *pool;
	cr_assert_geq(api->abi_minor, 4);
	cr_assert_geq(api->size, offsetof(kvp_plugin_v1, pool_flush) + sizeof api->pool_flush);
	cr_assert_eq(api->pool_open("", &pool), KVP_OK);
	cr_assert_eq(api->pool_remote_stats(pool, &r), KVP_OK, "%s", api->last_error());
	cr_assert_eq(r.queued, 0, "no remote tier: nothing queued");
	cr_assert_eq(api->pool_flush(pool, 0), KVP_OK);
	api->pool_close(pool);
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

static int host_has_jemalloc(void)
{
	return dlsym(RTLD_DEFAULT, "mallocx") != NULL;
}

static int defined_by_library(const char *name)
{
	Dl_info where;
	void *sym = dlsym(library, name);
	return sym && dladdr(sym, &where) && where.dli_fname && strstr(where.dli_fname, "libkvpager");
}

Test(plugin, the_host_has_no_jemalloc_but_in_the_preloaded_run)
{
	int preloaded = getenv(HOST_JEMALLOC_ENV) != NULL;
	kvp_pool *pool;
	const kvp_plugin_v1 *api;
	cr_assert_eq(host_has_jemalloc(), preloaded, "%s",
		     preloaded ? "LD_PRELOAD=libjemalloc.so.2 did not load it: install libjemalloc2"
			       : "this host must not have jemalloc: its link line names one");
	api = open_table(KVP_ABI_MAJOR);
	cr_assert_eq(api->pool_open("mem=1MiB", &pool), KVP_OK, "%s", api->last_error());
	api->pool_close(pool);
	/* Looked up in the library's own scope, which starts with the library: a malloc or free it
	 * exported would be found there, and would take over the host's. */
	cr_assert_not(defined_by_library("malloc"));
	cr_assert_not(defined_by_library("free"));
	cr_assert_not(defined_by_library("mallocx"));
	cr_assert_null(dlsym(library, "kvp_je_mallocx"), "the private jemalloc is not exported");
	cr_assert_eq(host_has_jemalloc(), preloaded, "loading the library gave the host no jemalloc");
	dlclose(library);
}

Test(plugin, the_library_needs_no_libjemalloc_and_no_static_tls)
{
	char path[512], cmd[600], line[512];
	int needed = 0;
	FILE *readelf;
	library_path(path, sizeof path);
	snprintf(cmd, sizeof cmd, "readelf -d %s", path);
	readelf = popen(cmd, "r");
	cr_assert_not_null(readelf);
	while (fgets(line, sizeof line, readelf)) {
		needed += strstr(line, "(NEEDED)") != NULL;
		cr_assert_null(strstr(line, "jemalloc"), "the library needs a jemalloc: %s", line);
		/* STATIC_TLS: initial-exec TLS, which glibc cannot give to a library loaded late. */
		cr_assert_null(strstr(line, "STATIC_TLS"), "the library needs static TLS: %s", line);
	}
	cr_assert_eq(pclose(readelf), 0, "readelf failed");
	cr_assert_geq(needed, 2, "readelf listed %d needed libraries", needed);
}

/* A small model: 2 layers, 4 query heads over 2 KV heads of 32 dims; 100 tokens take about 110 KB. */
enum { LAYERS = 2, HEADS = 4, KV = 2, DIM = 32, ROW = KV * DIM, OUT = HEADS * DIM };
static const kvp_shape host_shape = { LAYERS, HEADS, KV, DIM, 10000.0f, KVP_ROPE_HALF };

static kvp_status host_fill(const kvp_plugin_v1 *api, kvp_seq *s, int32_t first, uint32_t n, uint64_t seed)
{
	static float k[200 * ROW], v[200 * ROW];
	int32_t pos[200];
	kvp_status st = KVP_OK;
	cr_assert_leq(n, 200);
	for (uint32_t i = 0; i < n; i++)
		pos[i] = first + (int32_t)i;
	for (uint32_t l = 0; l < LAYERS && st == KVP_OK; l++) {
		fixture_fill(k, (size_t)n * ROW, seed + 2 * l, 2);
		fixture_fill(v, (size_t)n * ROW, seed + 2 * l + 1, 2);
		st = api->append(s, l, n, pos, k, v);
	}
	return st;
}

static void host_attend(const kvp_plugin_v1 *api, kvp_seq *s, float *out)
{
	float q[OUT];
	fixture_fill(q, OUT, 4242, 1);
	for (uint32_t l = 0; l < LAYERS; l++)
		cr_assert_eq(api->attend(s, l, q, out + l * OUT), KVP_OK, "%s", api->last_error());
}

static kvp_stats host_seq_stats(const kvp_plugin_v1 *api, const kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };
	cr_assert_eq(api->seq_stats(s, &st), KVP_OK);
	return st;
}

Test(plugin, a_host_opens_pools_and_tenants_with_quotas_that_spill_and_park)
{
	const kvp_plugin_v1 *api = open_table(KVP_ABI_MAJOR);
	float before[LAYERS * OUT], after[LAYERS * OUT], out[LAYERS * OUT];
	kvp_pool *pool;
	kvp_tenant *t, *small;
	kvp_seq *a, *b, *c, *lone;
	kvp_stats st = { .size = sizeof st };

	spill_fixture_open("16MiB", ",mem=64MiB");
	cr_assert_eq(api->pool_open(spill_spec, &pool), KVP_OK, "%s", api->last_error());
	cr_assert_eq(api->tenant_open(pool, "t", "block=16,sinks=4,quota=400KiB", &t), KVP_OK, "%s",
		     api->last_error());
	cr_assert_eq(api->tenant_open(pool, "small", "block=16,quota=64KiB", &small), KVP_OK, "%s",
		     api->last_error());

	/* The quota binds: a lone sequence has nothing idle to spill, so 100 tokens over 64 KiB fail. */
	cr_assert_eq(api->seq_open(small, &host_shape, &lone), KVP_OK);
	cr_assert_eq(host_fill(api, lone, 0, 100, 9), KVP_ENOMEM);
	cr_assert(strstr(api->last_error(), "quota"), "%s", api->last_error());
	cr_assert_eq(api->tenant_stats(small, &st), KVP_OK);
	cr_assert_leq(st.bytes_exact + st.bytes_meta, 64 * 1024);

	/* Three sequences fill most of 400 KiB; b is the least recently used when c grows past it. */
	cr_assert_eq(api->seq_open(t, &host_shape, &a), KVP_OK);
	cr_assert_eq(api->seq_open(t, &host_shape, &b), KVP_OK);
	cr_assert_eq(api->seq_open(t, &host_shape, &c), KVP_OK);
	cr_assert_eq(host_fill(api, a, 0, 100, 1), KVP_OK, "%s", api->last_error());
	cr_assert_eq(host_fill(api, b, 0, 100, 2), KVP_OK, "%s", api->last_error());
	cr_assert_eq(host_fill(api, c, 0, 100, 3), KVP_OK, "%s", api->last_error());
	host_attend(api, b, before);
	host_attend(api, a, out);
	host_attend(api, c, out);
	cr_assert_eq(host_fill(api, c, 100, 100, 4), KVP_OK, "%s", api->last_error());
	cr_assert_gt(host_seq_stats(api, b).bytes_spilled, 0, "b's blocks went to the spill device");
	cr_assert_eq(host_seq_stats(api, c).bytes_spilled, 0);
	host_attend(api, b, after);
	cr_assert_arr_eq(after, before, sizeof before, "b came back bit-identical");

	/* Park by hand: memory freed, calls refused, then the same attention as before. */
	cr_assert_eq(api->seq_park(a), KVP_OK, "%s", api->last_error());
	st = host_seq_stats(api, a);
	cr_assert_gt(st.bytes_spilled, 0);
	cr_assert_eq(st.bytes_exact, 0, "a parked sequence holds no token memory");
	cr_assert_eq(api->attend(a, 0, before, out), KVP_EINVAL);
	host_attend(api, b, before);
	cr_assert_eq(api->seq_unpark(a), KVP_OK, "%s", api->last_error());
	cr_assert_eq(host_seq_stats(api, a).bytes_spilled, 0);
	host_attend(api, b, after);
	cr_assert_arr_eq(after, before, sizeof before);

	api->pool_close(pool);
	cr_assert_eq(spill_fixture_close(), 0, "the pool removed its spill file");
	dlclose(library);
}

/* A serving engine's worker thread allocates through the library and exits after the host unloaded it:
 * jemalloc's per-thread destructor runs at that exit, so the library must stay mapped. */
static const kvp_plugin_v1 *thread_api;
static pthread_mutex_t thread_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t thread_cond = PTHREAD_COND_INITIALIZER;
static int thread_stage;

static void *worker(void *arg)
{
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *s;
	kvp_status *st = arg;
	*st = thread_api->pool_open("mem=16MiB", &pool);
	if (*st == KVP_OK && (*st = thread_api->tenant_open(pool, "w", "block=16", &t)) == KVP_OK &&
	    (*st = thread_api->seq_open(t, &host_shape, &s)) == KVP_OK)
		*st = host_fill(thread_api, s, 0, 50, 5);
	if (*st == KVP_OK)
		thread_api->pool_close(pool);
	pthread_mutex_lock(&thread_lock);
	thread_stage = 1;
	pthread_cond_broadcast(&thread_cond);
	while (thread_stage != 2)
		pthread_cond_wait(&thread_cond, &thread_lock);
	pthread_mutex_unlock(&thread_lock);
	return NULL;
}

Test(plugin, a_thread_that_used_the_library_exits_safely_after_dlclose)
{
	pthread_t th;
	kvp_status st = KVP_EINVAL;
	thread_api = open_table(KVP_ABI_MAJOR);
	cr_assert_eq(pthread_create(&th, NULL, worker, &st), 0);
	pthread_mutex_lock(&thread_lock);
	while (thread_stage != 1)
		pthread_cond_wait(&thread_cond, &thread_lock);
	cr_assert_eq(st, KVP_OK, "the worker's pool: %s", thread_api->strerror(st));
	cr_assert_eq(dlclose(library), 0);
	thread_stage = 2;
	pthread_cond_broadcast(&thread_cond);
	pthread_mutex_unlock(&thread_lock);
	cr_assert_eq(pthread_join(th, NULL), 0);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define UNDER_SANITIZER 1
#endif
#endif

/* Runs every test above again in a host whose malloc is the system's jemalloc, and reads its summary. */
Test(plugin, every_test_passes_again_in_a_host_that_preloads_its_own_jemalloc)
{
	char self[512], cmd[700], line[1024], summary[1024] = "";
	unsigned tested = 0, passing = 0, failing = 0, crashing = 0;
	ssize_t n;
	FILE *run;
	int rc;
	if (getenv(HOST_JEMALLOC_ENV))
		cr_skip_test("this is the preloaded run");
#ifdef UNDER_SANITIZER
	cr_skip_test("under a sanitizer the host's malloc is the sanitizer's, which must stay first");
#endif
	n = readlink("/proc/self/exe", self, sizeof self - 1);
	cr_assert_gt(n, 0);
	self[n] = '\0';
	snprintf(cmd, sizeof cmd, "env -u BXFI_MAP LD_PRELOAD=libjemalloc.so.2 %s=1 '%s' 2>&1", HOST_JEMALLOC_ENV, self);
	run = popen(cmd, "r");
	cr_assert_not_null(run);
	while (fgets(line, sizeof line, run)) {
		if (strstr(line, "Synthesis: Tested:"))
			snprintf(summary, sizeof summary, "%s", line);
		else if (strstr(line, "[FAIL]") || strstr(line, "CRASH") || strstr(line, "ld.so") || strstr(line, "ERROR"))
			cr_log_error("preloaded run: %s", line);
	}
	rc = pclose(run);
	cr_assert_neq(summary[0], '\0', "the preloaded run printed no summary (exit %d)", rc);
	cr_assert_eq(sscanf(strstr(summary, "Tested:"), "Tested: %u | Passing: %u | Failing: %u | Crashing: %u",
			    &tested, &passing, &failing, &crashing), 4, "%s", summary);
	cr_assert_eq(failing + crashing, 0, "preloaded run: %s", summary);
	cr_assert_geq(passing, 7, "preloaded run: %s", summary);
	cr_assert_eq(rc, 0, "preloaded run exited %d", rc);
}
