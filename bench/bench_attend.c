/*
 * Exact kvp_attend decode latency (one token, one layer) against two baselines measured in the same run:
 *   - a plain dense fp32 attention loop over contiguous [tokens][head_dim] arrays;
 *   - the memory-bandwidth floor: bytes of K and V read / measured memcpy bandwidth.
 * Shape: d=128, 8 KV heads, 32 query heads (GQA 4), 4K and 32K tokens.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kernels/kernels.h"
#include "kvpager.h"

enum { D = 128, NKV = 8, NH = 32, GROUP = NH / NKV };

struct dense {
	uint32_t n;
	float *k, *v; /* [NKV][n][D] */
	float *q, *out, *scores;
};

/* The baseline a user would write first: per query head, scores, softmax, weighted sum. */
static void dense_attend(void *arg)
{
	struct dense *a = arg;
	const float scale = 1.0f / sqrtf((float)D);
	for (uint32_t h = 0; h < NH; h++) {
		const float *k = a->k + (size_t)(h / GROUP) * a->n * D, *v = a->v + (size_t)(h / GROUP) * a->n * D;
		const float *q = a->q + h * D;
		float *out = a->out + h * D, m = -INFINITY, l = 0;
		for (uint32_t i = 0; i < a->n; i++) {
			float s = 0;
			for (uint32_t j = 0; j < D; j++)
				s += q[j] * k[(size_t)i * D + j];
			a->scores[i] = s * scale;
			m = a->scores[i] > m ? a->scores[i] : m;
		}
		memset(out, 0, D * sizeof *out);
		for (uint32_t i = 0; i < a->n; i++) {
			float p = expf(a->scores[i] - m);
			l += p;
			for (uint32_t j = 0; j < D; j++)
				out[j] += p * v[(size_t)i * D + j];
		}
		for (uint32_t j = 0; j < D; j++)
			out[j] /= l;
	}
}

struct paged {
	kvp_seq *seq;
	const float *q;
	float *out;
};

static void paged_attend(void *arg)
{
	struct paged *a = arg;
	if (kvp_attend(a->seq, 0, a->q, a->out) != KVP_OK) {
		fprintf(stderr, "kvp_attend: %s\n", kvp_last_error());
		exit(1);
	}
}

static void fill(float *x, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		x[i] = (float)((seed >> 40) * 0x1p-24) - 0.5f;
	}
}

static kvp_seq *paged_cache(kvp_tenant *t, uint32_t n, const float *k_by_head, const float *v_by_head)
{
	const kvp_shape sh = { 1, NH, NKV, D, 10000.0f, KVP_ROPE_HALF };
	enum { CHUNK = 1024 };
	static float k[CHUNK * NKV * D], v[CHUNK * NKV * D];
	static int32_t pos[CHUNK];
	kvp_seq *s;
	if (kvp_seq_open(t, &sh, &s) != KVP_OK)
		return NULL;
	for (uint32_t at = 0; at < n; at += CHUNK) {
		uint32_t m = n - at < CHUNK ? n - at : CHUNK;
		for (uint32_t i = 0; i < m; i++) {
			pos[i] = (int32_t)(at + i);
			for (uint32_t g = 0; g < NKV; g++) {
				memcpy(k + ((size_t)i * NKV + g) * D, k_by_head + ((size_t)g * n + at + i) * D, D * 4);
				memcpy(v + ((size_t)i * NKV + g) * D, v_by_head + ((size_t)g * n + at + i) * D, D * 4);
			}
		}
		if (kvp_append(s, 0, m, pos, k, v) != KVP_OK)
			return NULL;
	}
	return s;
}

/* The same cache with a TurboQuant cold tier: all but the hot window read from the codes. */
static void run_cold(kvp_pool *pool, uint32_t n, const struct dense *dn, int bits, double t_fp16, int reps)
{
	struct paged pg = { NULL, dn->q, malloc(NH * D * 4) };
	char config[64], spec[128], name[16];
	kvp_tenant *t;
	double t_paged;

	snprintf(spec, sizeof spec, "block=64,window=128,store=fp16,k=turboquant(bits=%d),v=turboquant(bits=%d)",
		 bits, bits);
	snprintf(name, sizeof name, "tq%d", bits);
	if (kvp_tenant_open(pool, name, spec, &t) != KVP_OK || !(pg.seq = paged_cache(t, n, dn->k, dn->v))) {
		fprintf(stderr, "bench_attend: %s\n", kvp_last_error());
		exit(1);
	}
	t_paged = bench_time(paged_attend, &pg, reps);
	snprintf(config, sizeof config, "kvp_attend turboquant %d-bit, %uK", bits, n / 1024);
	bench_row(config, "decode latency", t_paged, t_fp16, 1e3, "ms", "kvp_attend fp16");
	kvp_tenant_close(t);
	free(pg.out);
}

static void run(kvp_pool *pool, uint32_t n, double bandwidth, int reps)
{
	struct dense dn = { n, malloc((size_t)NKV * n * D * 4), malloc((size_t)NKV * n * D * 4), malloc(NH * D * 4),
			    malloc(NH * D * 4), malloc((size_t)n * 4) };
	static const char *const stores[] = { "fp32", "fp16" };
	char config[64], spec[64];
	double t_dense;

	fill(dn.k, (size_t)NKV * n * D, 1);
	fill(dn.v, (size_t)NKV * n * D, 2);
	fill(dn.q, NH * D, 3);
	t_dense = bench_time(dense_attend, &dn, reps);
	snprintf(config, sizeof config, "dense fp32 loop, %uK tokens", n / 1024);
	bench_row(config, "decode latency", t_dense, t_dense, 1e3, "ms", "itself");
	double t_fp16 = 0;
	for (int st = 0; st < 2; st++) {
		struct paged pg = { NULL, dn.q, malloc(NH * D * 4) };
		size_t bytes = (size_t)n * NKV * D * 2 * (st ? 2 : 4);
		kvp_tenant *t;
		double t_paged, floor_s = (double)bytes / bandwidth;
		snprintf(spec, sizeof spec, "block=64,store=%s", stores[st]);
		if (kvp_tenant_open(pool, stores[st], spec, &t) != KVP_OK || !(pg.seq = paged_cache(t, n, dn.k, dn.v))) {
			fprintf(stderr, "bench_attend: %s\n", kvp_last_error());
			exit(1);
		}
		t_paged = bench_time(paged_attend, &pg, reps);
		snprintf(config, sizeof config, "kvp_attend %s, %uK tokens", stores[st], n / 1024);
		bench_row(config, "decode latency", t_paged, t_dense, 1e3, "ms", "dense fp32 loop");
		bench_row(config, "decode latency", t_paged, floor_s, 1e3, "ms", "bandwidth floor");
		kvp_tenant_close(t);
		free(pg.out);
		t_fp16 = t_paged;
	}
	for (int bits = 4; bits >= 2; bits--)
		run_cold(pool, n, &dn, bits, t_fp16, reps);
	free(dn.k), free(dn.v), free(dn.q), free(dn.out), free(dn.scores);
}

int main(void)
{
	kvp_pool *pool;
	double bw = bench_memcpy_bandwidth((size_t)256 << 20);
	int reps = bench_reps(10);
	char floor_note[96];

	if (kvp_pool_open("", &pool) != KVP_OK) {
		fprintf(stderr, "bench_attend: %s\n", kvp_last_error());
		return 1;
	}
	snprintf(floor_note, sizeof floor_note, "memcpy bandwidth %.2f GB/s; kernels: %s", bw / 1e9, kvp_kernels()->name);
	bench_header("Attention, one decode token over one layer: d=128, 8 KV heads, 32 query heads");
	printf("%s\n", floor_note);
	run(pool, 4096, bw, reps);
	run(pool, 32768, bw, reps);
	kvp_pool_close(pool);
	return 0;
}
