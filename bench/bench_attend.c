/*
 * kvp_attend decode latency (one token, one layer) against baselines measured in the same run, each call
 * timed with the caches emptied first (bench_time_cold): in a model every other layer is read between two
 * reads of one, so a layer never finds itself in cache, while one layer called again and again would (a
 * compressed layer at 32K tokens is 13-30 MB, about one L3 slice; it took 15-35% less time there):
 *   - a plain dense fp32 attention loop over contiguous [tokens][head_dim] arrays;
 *   - the fp16 cache (block=64,store=fp16), the thing a compressed cold tier replaces;
 *   - each configuration's own bandwidth floor: the bytes of K and V it reads (its token storage, from
 *     kvp_seq_stats) over the measured memcpy bandwidth.
 * A compressed configuration runs in turns with the fp16 cache and a 256 MiB memcpy (bench_time_cold_turns),
 * and its two ratios are to their best times in those turns; the fp16 and fp32 caches' floors come from
 * turns of their own with the memcpy. The header's memcpy figure is a probe taken once at the start.
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

/* A configuration's cache over the data, and the call that bench_time_cold* times. */
struct layer {
	kvp_tenant *tenant;
	struct paged pg;
};

static void layer_open(kvp_pool *pool, const char *name, const char *spec, const struct dense *dn, struct layer *l)
{
	if (kvp_tenant_open(pool, name, spec, &l->tenant) != KVP_OK)
		fail(spec);
	l->pg = (struct paged){ paged_cache(l->tenant, dn), dn->q, malloc(sizeof(float) * NH * DMAX) };
}

static void layer_close(struct layer *l)
{
	kvp_tenant_close(l->tenant);
	free(l->pg.out);
}

/* The n <= 2 layers and a memcpy, in turns (bench_time_cold_turns): each layer's best time into t[], and the
 * memcpy bandwidth of the same turns, bytes/s. */
static double time_in_turns(struct layer *const *l, unsigned n, struct bench_copy *copy, size_t copy_bytes, int reps,
			    double *t)
{
	struct bench_call calls[3];
	double best[3];

	for (unsigned k = 0; k < n; k++)
		calls[k] = (struct bench_call){ paged_attend, &l[k]->pg };
	calls[n] = (struct bench_call){ bench_copy_run, copy };
	bench_time_cold_turns(calls, n + 1, reps, best);
	for (unsigned k = 0; k < n; k++)
		t[k] = best[k];
	return (double)copy_bytes / best[n];
}

static const struct {
	const char *name, *spec;
} cold[] = {
	{ "turboquant 4-bit", "block=64,window=128,store=fp16,k=turboquant(bits=4),v=turboquant(bits=4)" },
	{ "turboquant 3-bit", "block=64,window=128,store=fp16,k=turboquant(bits=3),v=turboquant(bits=3)" },
	{ "turboquant 2-bit", "block=64,window=128,store=fp16,k=turboquant(bits=2),v=turboquant(bits=2)" },
	{ "kivi 2-bit", "block=64,window=128,store=fp16,k=kivi(bits=2),v=kivi(bits=2)" },
	/* the default, quantize=auto: rotated over turboquant(bits=3) */
	{ "spark|tq3 k, tq3 v",
	  "block=64,window=128,store=fp16,k=spark(keep=0.5)|turboquant(bits=3),v=turboquant(bits=3)" },
	{ "spark(kept)|tq3 k, tq3 v",
	  "block=64,window=128,store=fp16,k=spark(keep=0.5,quantize=kept)|turboquant(bits=3),v=turboquant(bits=3)" },
};

/* Each compressed configuration is timed in turns with the fp16 cache and the memcpy probe, and its ratios
 * are to their times in those turns: on a shared machine the fp16 cache's own time moved by a third between
 * runs a minute apart, and ratios to a figure taken once moved with it. */
static void run(kvp_pool *pool, uint32_t n, uint32_t d, struct bench_copy *copy, size_t copy_bytes, int reps,
		const char *only)
{
	struct dense dn = { n, d, malloc((size_t)NKV * n * d * 4), malloc((size_t)NKV * n * d * 4),
			    malloc(NH * d * 4), malloc(NH * d * 4), malloc((size_t)n * 4) };
	static const char *const stores[] = { "fp32", "fp16" };
	struct layer base[2], one;
	char config[80], spec[64], floor_name[64], base_name[64];
	double t_dense, t[2], bw;

	fill(dn.k, (size_t)NKV * n * d, 1);
	fill(dn.v, (size_t)NKV * n * d, 2);
	fill(dn.q, NH * d, 3);
	t_dense = bench_time_cold(dense_attend, &dn, reps);
	snprintf(config, sizeof config, "dense fp32 loop, %uK, d=%u", n / 1024, d);
	bench_row(config, "decode latency", t_dense, t_dense, 1e3, "ms", "itself");
	for (int st = 0; st < 2; st++) {
		struct layer *l = &base[st];

		snprintf(spec, sizeof spec, "block=64,store=%s", stores[st]);
		layer_open(pool, stores[st], spec, &dn, l);
		bw = time_in_turns(&l, 1, copy, copy_bytes, reps, t);
		snprintf(config, sizeof config, "kvp_attend %s, %uK, d=%u", stores[st], n / 1024, d);
		bench_row(config, "decode latency", t[0], t_dense, 1e3, "ms", "dense fp32 loop");
		snprintf(floor_name, sizeof floor_name, "its bandwidth floor (memcpy %.1f GB/s)", bw / 1e9);
		bench_row(config, "decode latency", t[0], storage_bytes(l->pg.seq) / bw, 1e3, "ms", floor_name);
		if (st == 0)
			layer_close(l);
	}
	for (size_t c = 0; c < sizeof cold / sizeof cold[0]; c++) {
		struct layer *pair[2] = { &base[1], &one };
		double err;

		if (only && !strstr(cold[c].name, only))
			continue;
		layer_open(pool, "compressed", cold[c].spec, &dn, &one);
		bw = time_in_turns(pair, 2, copy, copy_bytes, reps, t);
		snprintf(config, sizeof config, "kvp_attend %s, %uK, d=%u", cold[c].name, n / 1024, d);
		snprintf(base_name, sizeof base_name, "kvp_attend fp16 (%.3f ms in turns)", t[0] * 1e3);
		bench_row(config, "decode latency", t[1], t[0], 1e3, "ms", base_name);
		snprintf(floor_name, sizeof floor_name, "its bandwidth floor (memcpy %.1f GB/s)", bw / 1e9);
		bench_row(config, "decode latency", t[1], storage_bytes(one.pg.seq) / bw, 1e3, "ms", floor_name);
		err = decoded_error(one.pg.seq, &dn, one.pg.out);
		printf("%-34s %-22s %14.2e\n", config, "error vs its decode", err);
		layer_close(&one);
	}
	layer_close(&base[1]);
	free(dn.k), free(dn.v), free(dn.q), free(dn.out), free(dn.scores);
}

int main(int argc, char **argv)
{
	const char *only = argc > 1 ? argv[1] : NULL;
	const size_t copy_bytes = (size_t)256 << 20;
	struct bench_copy *copy = bench_copy_open(copy_bytes);
	kvp_pool *pool;
	double bw = bench_memcpy_bandwidth(copy);
	int reps = bench_reps(10);

	if (kvp_pool_open("", &pool) != KVP_OK)
		fail("kvp_pool_open");
	bench_header("Attention, one decode token over one layer: 8 KV heads, 32 query heads");
	printf("memcpy bandwidth %.2f GB/s; kernels: %s\n", bw / 1e9, kvp_kernels()->name);
	for (uint32_t d = 128; d >= 64; d /= 2) {
		run(pool, 4096, d, copy, copy_bytes, reps, only);
		run(pool, 32768, d, copy, copy_bytes, reps, only);
	}
	kvp_pool_close(pool);
	bench_copy_close(copy);
	return 0;
}
