/*
 * Suite stack: the library on a thread with a small stack. A host may call from threads with little
 * stack (musl gives 128 KiB), so no frame of the library takes more than 16 KiB (`make stack` checks the
 * build). Each test runs the same work on the test's own thread and on a thread whose 24 KiB stack (glibc
 * keeps the thread's TLS in it too) sits above 1 MiB of inaccessible memory, so that a frame too large
 * for it faults instead of landing in a neighbouring mapping; the two runs must give the same bytes.
 * Before the frames were cut, every test but the KIVI one crashed there (KIVI's frames were 16.5 KiB).
 * AddressSanitizer's redzones grow every frame, so its build gets 8 times the stack.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "codecs/codec.h"
#include "kvpager.h"
#include "pager_fixture.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifdef SANITIZED
#define SMALL_STACK (192u << 10)
#else
#define SMALL_STACK (24u << 10)
#endif
#define GUARD (1u << 20)

/* Runs work(arg) on a new thread with SMALL_STACK bytes of stack above GUARD bytes no access may touch. */
static void run_on_small_stack(void *(*work)(void *), void *arg)
{
	pthread_attr_t attr;
	pthread_t thread;
	char *region = mmap(NULL, GUARD + SMALL_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	cr_assert_neq(region, MAP_FAILED);
	cr_assert_eq(mprotect(region, GUARD, PROT_NONE), 0);
	cr_assert_eq(pthread_attr_init(&attr), 0);
	cr_assert_eq(pthread_attr_setstack(&attr, region + GUARD, SMALL_STACK), 0);
	cr_assert_eq(pthread_create(&thread, &attr, work, arg), 0);
	cr_assert_eq(pthread_join(thread, NULL), 0);
	pthread_attr_destroy(&attr);
	munmap(region, GUARD + SMALL_STACK);
}

/* ---- a codec on its own: fit (on the first encode), encode, decode, dot ---- */

enum { D = 128, N = 64 };

struct codec_run {
	const char *spec;
	kvp_status st;
	unsigned char codes[N * 4 * D];
	float decoded[N * D], scores[N];
	char message[256];
};

static void *codec_work(void *arg)
{
	static float x[N * D], q[D]; /* not on the small stack: one run at a time */
	struct codec_run *r = arg;
	kvp_codec *c = NULL;

	fixture_fill(x, N * D, 21, 1.0f);
	fixture_fill(q, D, 22, 1.0f);
	for (unsigned j = 0; j < D; j += 16) /* a few loud channels, so outliers= has something to choose */
		for (unsigned i = 0; i < N; i++)
			x[i * D + j] *= 8.0f;
	r->st = kvp_codec_open(r->spec, D, &c);
	if (r->st == KVP_OK && kvp_codec_bytes(c, N) > sizeof r->codes)
		r->st = KVP_EINVAL;
	if (r->st == KVP_OK)
		r->st = kvp_codec_encode(c, N, x, r->codes);
	if (r->st == KVP_OK)
		r->st = kvp_codec_decode(c, N, r->codes, r->decoded);
	if (r->st == KVP_OK)
		r->st = kvp_codec_dot(c, N, r->codes, q, r->scores);
	if (r->st != KVP_OK)
		snprintf(r->message, sizeof r->message, "%s", kvp_last_error());
	kvp_codec_close(c);
	return NULL;
}

static void codec_runs_the_same_on_a_small_stack(const char *spec)
{
	static struct codec_run big, small;

	memset(&big, 0, sizeof big);
	memset(&small, 0, sizeof small);
	big.spec = small.spec = spec;
	codec_work(&big);
	cr_assert_eq(big.st, KVP_OK, "%s: %s", spec, big.message);
	run_on_small_stack(codec_work, &small);
	cr_assert_eq(small.st, KVP_OK, "%s on a small stack: %s", spec, small.message);
	cr_assert_eq(memcmp(&big, &small, sizeof big), 0, "%s: the small stack's codes, values or scores differ",
		     spec);
}

Test(stack, spark_fits_encodes_decodes_and_dots_on_a_small_stack)
{
	codec_runs_the_same_on_a_small_stack("spark(keep=0.5)|turboquant(bits=3,outliers=8)");
	codec_runs_the_same_on_a_small_stack("spark(keep=0.25)");
}

Test(stack, turboquant_fits_encodes_decodes_and_dots_on_a_small_stack)
{
	codec_runs_the_same_on_a_small_stack("turboquant(bits=3,qjl=1,outliers=16)");
	codec_runs_the_same_on_a_small_stack("turboquant(bits=2)");
}

Test(stack, kivi_encodes_decodes_and_dots_on_a_small_stack)
{
	codec_runs_the_same_on_a_small_stack("kivi(bits=2,group=32)");
	codec_runs_the_same_on_a_small_stack("kivi(bits=4,group=32,axis=token)");
}

/* ---- a sequence: appends that turn blocks cold (encode), then kvp_attend over every tier ---- */

enum { HEADS = 8, KV_HEADS = 2, TOKENS = 96 };

struct attend_run {
	kvp_seq *seq;
	kvp_status st;
	float out[HEADS * D];
	char message[256];
};

static void *attend_work(void *arg)
{
	static float k[TOKENS * KV_HEADS * D], v[TOKENS * KV_HEADS * D], q[HEADS * D]; /* one run at a time */
	struct attend_run *r = arg;
	int32_t pos[TOKENS];

	fixture_fill(k, TOKENS * KV_HEADS * D, 31, 1.0f);
	fixture_fill(v, TOKENS * KV_HEADS * D, 32, 1.0f);
	fixture_fill(q, HEADS * D, 33, 1.0f);
	for (int i = 0; i < TOKENS; i++)
		pos[i] = i;
	r->st = KVP_OK;
	for (int i = 0; r->st == KVP_OK && i < TOKENS; i += 8)
		r->st = kvp_append(r->seq, 0, 8, pos + i, k + (size_t)i * KV_HEADS * D, v + (size_t)i * KV_HEADS * D);
	if (r->st == KVP_OK)
		r->st = kvp_attend(r->seq, 0, q, r->out);
	if (r->st != KVP_OK)
		snprintf(r->message, sizeof r->message, "%s", kvp_last_error());
	return NULL;
}

static void attend_runs_the_same_on_a_small_stack(const char *spec)
{
	static struct attend_run big, small;
	kvp_shape shape = { .n_layers = 1, .n_heads = HEADS, .n_kv_heads = KV_HEADS, .head_dim = D,
			    .rope_theta = 10000.0f, .rope_layout = KVP_ROPE_HALF };
	kvp_pool *pool;
	kvp_tenant *tenant;

	memset(&big, 0, sizeof big);
	memset(&small, 0, sizeof small);
	cr_assert_eq(kvp_pool_open("mem=64MiB", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &tenant), KVP_OK, "%s: %s", spec, kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &shape, &big.seq), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &shape, &small.seq), KVP_OK, "%s", kvp_last_error());
	attend_work(&big);
	cr_assert_eq(big.st, KVP_OK, "%s: %s", spec, big.message);
	run_on_small_stack(attend_work, &small);
	cr_assert_eq(small.st, KVP_OK, "%s on a small stack: %s", spec, small.message);
	cr_assert_eq(memcmp(big.out, small.out, sizeof big.out), 0, "%s: the small stack's attention differs", spec);
	kvp_pool_close(pool);
}

Test(stack, attend_over_turboquant_and_kivi_blocks_runs_on_a_small_stack)
{
	attend_runs_the_same_on_a_small_stack(
		"block=16,sinks=4,window=16,k=turboquant(bits=3,qjl=1,outliers=16),v=kivi(bits=2,group=32,axis=token)");
}

Test(stack, attend_over_spark_and_turboquant_blocks_runs_on_a_small_stack)
{
	attend_runs_the_same_on_a_small_stack(
		"block=32,sinks=0,window=16,k=spark(keep=0.5)|turboquant(bits=3,outliers=8),v=turboquant(bits=4)");
	/* without outliers the keys take the integer kernel, whose sixteen rows' passes keep their rows in
	 * its frame */
	attend_runs_the_same_on_a_small_stack(
		"block=32,sinks=0,window=16,k=spark(keep=0.5)|turboquant(bits=3),v=turboquant(bits=3)");
}

Test(stack, attend_over_fp16_blocks_runs_on_a_small_stack)
{
	attend_runs_the_same_on_a_small_stack("block=16,sinks=4,window=16,store=fp16");
}
