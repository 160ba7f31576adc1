/*
 * kvp_attend decode latency (one token, one layer) against baselines measured in the same run, each call
 * timed with the caches emptied first (bench_time_cold): in a model every other layer is read between two
 * reads of one, so a layer never finds itself in cache, while one layer called again and again would (a
 * compressed layer at 32K tokens is 13-30 MB, about one L3 slice; it took 15-35% less time there):
 *   - a plain dense fp32 attention loop over contiguous [tokens][head_dim] arrays;
 *   - the fp16 cache (block=64,store=fp16), the thing a compressed cold tier replaces;
 *   - each configuration's own bandwidth floor: the bytes of K and V it reads (its token storage, from
 *     kvp_seq_stats) over the measured memcpy bandwidth.
 * Compressed configurations also print their output's relative error against exact attention over the
 * vectors their codes decode to (kvp_gather), the worst of the 32 query heads.
 * Shape: 8 KV heads, 32 query heads (GQA 4), d = 128 and 64, 4K and 32K tokens.
 * `bench_attend WORD` runs only the compressed configurations whose name contains WORD (the baselines
 * always run): `bench_attend kivi`.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kernels/kernels.h"
#include "kvpager.h"

enum { NKV = 8, NH = 32, GROUP = NH / NKV, DMAX = 128 };

struct dense {
	uint32_t n, d;
	float *k, *v; /* [NKV][n][d] */
	float *q, *out, *scores;
};

/* The baseline a user would write first: per query head, scores, softmax, weighted sum. */
static void dense_attend(void *arg)
{
	struct dense *a = arg;
	const uint32_t D = a->d;
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

static void fail(const char *what)
{
	fprintf(stderr, "bench_attend: %s: %s\n", what, kvp_last_error());
	exit(1);
}

static kvp_seq *paged_cache(kvp_tenant *t, const struct dense *dn)
{
	const kvp_shape sh = { 1, NH, NKV, dn->d, 10000.0f, KVP_ROPE_HALF };
	enum { CHUNK = 1024 };
	static float k[CHUNK * NKV * DMAX], v[CHUNK * NKV * DMAX];
	static int32_t pos[CHUNK];
	const uint32_t D = dn->d;
	kvp_seq *s;

	if (kvp_seq_open(t, &sh, &s) != KVP_OK)
		fail("kvp_seq_open");
	for (uint32_t at = 0; at < dn->n; at += CHUNK) {
		uint32_t m = dn->n - at < CHUNK ? dn->n - at : CHUNK;
		for (uint32_t i = 0; i < m; i++) {
			pos[i] = (int32_t)(at + i);
			for (uint32_t g = 0; g < NKV; g++) {
				memcpy(k + ((size_t)i * NKV + g) * D, dn->k + ((size_t)g * dn->n + at + i) * D, D * 4);
				memcpy(v + ((size_t)i * NKV + g) * D, dn->v + ((size_t)g * dn->n + at + i) * D, D * 4);
			}
		}
		if (kvp_append(s, 0, m, pos, k, v) != KVP_OK)
			fail("kvp_append");
	}
	return s;
}

/* Bytes of token storage attention reads: the bandwidth floor's numerator. */
static double storage_bytes(const kvp_seq *s)
{
	kvp_stats st = { .size = sizeof st };

	if (kvp_seq_stats(s, &st) != KVP_OK)
		fail("kvp_seq_stats");
	return (double)(st.bytes_exact + st.bytes_compressed);
}

/* Worst head's ||out - ref|| / ||ref||, ref being exact attention over what kvp_gather returns. */
static double decoded_error(kvp_seq *s, const struct dense *dn, const float *out)
{
	const uint32_t D = dn->d, n = dn->n;
	float *k = malloc(sizeof *k * n * D), *v = malloc(sizeof *v * n * D);
	int32_t *pos = malloc(sizeof *pos * n);
	double *sc = malloc(sizeof *sc * n), worst = 0;

	for (uint32_t g = 0; g < NKV; g++) {
		uint32_t got;
		if (kvp_gather(s, 0, g, n, pos, k, v, &got) != KVP_OK)
			fail("kvp_gather");
		for (uint32_t h = g * GROUP; h < (g + 1) * GROUP; h++) {
			const float *q = dn->q + h * D;
			double ref[DMAX] = { 0 }, m = -INFINITY, l = 0, num = 0, den = 0;
			for (uint32_t i = 0; i < got; i++) {
				double dot = 0;
				for (uint32_t j = 0; j < D; j++)
					dot += (double)q[j] * k[(size_t)i * D + j];
				sc[i] = dot / sqrt((double)D);
				m = sc[i] > m ? sc[i] : m;
			}
			for (uint32_t i = 0; i < got; i++) {
				double p = exp(sc[i] - m);
				l += p;
				for (uint32_t j = 0; j < D; j++)
					ref[j] += p * v[(size_t)i * D + j];
			}
			for (uint32_t j = 0; j < D; j++) {
				double r = ref[j] / l;
				num += (out[h * D + j] - r) * (out[h * D + j] - r);
				den += r * r;
			}
			worst = fmax(worst, sqrt(num / den));
		}
	}
	free(k), free(v), free(pos), free(sc);
	return worst;
}

/* Opens spec over the data, times kvp_attend, and closes it; returns the time, fills *bytes. */
static double run_spec(kvp_pool *pool, const char *spec, const struct dense *dn, int reps, double *bytes,
		       double *error)
{
	struct paged pg = { NULL, dn->q, malloc(sizeof(float) * NH * DMAX) };
	kvp_tenant *t;
	double s;

	if (kvp_tenant_open(pool, "bench", spec, &t) != KVP_OK)
		fail(spec);
	pg.seq = paged_cache(t, dn);
	s = bench_time_cold(paged_attend, &pg, reps);
	*bytes = storage_bytes(pg.seq);
	if (error)
		*error = decoded_error(pg.seq, dn, pg.out);
	kvp_tenant_close(t);
	free(pg.out);
	return s;
}

static const struct {
	const char *name, *spec;
} cold[] = {
	{ "turboquant 4-bit", "block=64,window=128,store=fp16,k=turboquant(bits=4),v=turboquant(bits=4)" },
	{ "turboquant 3-bit", "block=64,window=128,store=fp16,k=turboquant(bits=3),v=turboquant(bits=3)" },
	{ "turboquant 2-bit", "block=64,window=128,store=fp16,k=turboquant(bits=2),v=turboquant(bits=2)" },
	{ "kivi 2-bit", "block=64,window=128,store=fp16,k=kivi(bits=2),v=kivi(bits=2)" },
	{ "spark|tq3 k, tq3 v",
	  "block=64,window=128,store=fp16,k=spark(keep=0.5)|turboquant(bits=3),v=turboquant(bits=3)" },
};

static void run(kvp_pool *pool, uint32_t n, uint32_t d, double bandwidth, int reps, const char *only)
{
	struct dense dn = { n, d, malloc((size_t)NKV * n * d * 4), malloc((size_t)NKV * n * d * 4),
			    malloc(NH * d * 4), malloc(NH * d * 4), malloc((size_t)n * 4) };
	static const char *const stores[] = { "fp32", "fp16" };
	char config[80], spec[64];
	double t_dense, t_fp16 = 0, bytes;

	fill(dn.k, (size_t)NKV * n * d, 1);
	fill(dn.v, (size_t)NKV * n * d, 2);
	fill(dn.q, NH * d, 3);
	t_dense = bench_time_cold(dense_attend, &dn, reps);
	snprintf(config, sizeof config, "dense fp32 loop, %uK, d=%u", n / 1024, d);
	bench_row(config, "decode latency", t_dense, t_dense, 1e3, "ms", "itself");
	for (int st = 0; st < 2; st++) {
		double t;
		snprintf(spec, sizeof spec, "block=64,store=%s", stores[st]);
		t = run_spec(pool, spec, &dn, reps, &bytes, NULL);
		snprintf(config, sizeof config, "kvp_attend %s, %uK, d=%u", stores[st], n / 1024, d);
		bench_row(config, "decode latency", t, t_dense, 1e3, "ms", "dense fp32 loop");
		bench_row(config, "decode latency", t, bytes / bandwidth, 1e3, "ms", "its bandwidth floor");
		t_fp16 = t;
	}
	for (size_t c = 0; c < sizeof cold / sizeof cold[0]; c++) {
		if (only && !strstr(cold[c].name, only))
			continue;
		double err, t = run_spec(pool, cold[c].spec, &dn, reps, &bytes, &err);
		snprintf(config, sizeof config, "kvp_attend %s, %uK, d=%u", cold[c].name, n / 1024, d);
		bench_row(config, "decode latency", t, t_fp16, 1e3, "ms", "kvp_attend fp16");
		bench_row(config, "decode latency", t, bytes / bandwidth, 1e3, "ms", "its bandwidth floor");
		printf("%-34s %-22s %14.2e\n", config, "error vs its decode", err);
	}
	free(dn.k), free(dn.v), free(dn.q), free(dn.out), free(dn.scores);
}

int main(int argc, char **argv)
{
	const char *only = argc > 1 ? argv[1] : NULL;
	kvp_pool *pool;
	double bw = bench_memcpy_bandwidth((size_t)256 << 20);
	int reps = bench_reps(10);

	if (kvp_pool_open("", &pool) != KVP_OK)
		fail("kvp_pool_open");
	bench_header("Attention, one decode token over one layer: 8 KV heads, 32 query heads");
	printf("memcpy bandwidth %.2f GB/s; kernels: %s\n", bw / 1e9, kvp_kernels()->name);
	for (uint32_t d = 128; d >= 64; d /= 2) {
		run(pool, 4096, d, bw, reps, only);
		run(pool, 32768, d, bw, reps, only);
	}
	kvp_pool_close(pool);
	return 0;
}
