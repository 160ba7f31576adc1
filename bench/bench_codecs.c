/*
 * Codecs on their own, d=128, every figure beside a baseline measured in the same run:
 *   - encode and decode of 4096 vectors, in ns per vector, against fp16's;
 *   - dot of one query over 32K encoded keys (prepare_query + fused dot), against the dense kernels
 *     dot_f32 and dot_f16 over the same 32K keys;
 *   - axpy of 32K weights over 32K encoded values (+ finish), against axpy_f32 and axpy_f16;
 *   - one head's attention over 32K tokens with keys and values in the codec (dot, softmax, axpy),
 *     against the same with fp16 rows and the dense kernels;
 *   - one layer's decode attention, 8 KV heads x 32K tokens, 4 query heads per KV head (bench_attend's
 *     shape): dense fp16 K and V are 128 MiB, beyond this machine's last-level cache, while 3-bit
 *     TurboQuant's are 26 MiB, so this is where reading fewer bytes shows.
 * Input is N(0,1). KVP_BENCH_REPS sets the repetitions (best of N after one warm-up).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "harness.h"
#include "kernels/kernels.h"

enum { D = 128, N_CODE = 4096, N_KEYS = 32768 };

struct spec {
	const char *text;
	unsigned role;
};

static const struct spec specs[] = {
	{ "fp32", KVP_CODEC_KEYS },
	{ "fp16", KVP_CODEC_KEYS },
	{ "turboquant(bits=1)", KVP_CODEC_KEYS },
	{ "turboquant(bits=2)", KVP_CODEC_KEYS },
	{ "turboquant(bits=3)", KVP_CODEC_KEYS },
	{ "turboquant(bits=4)", KVP_CODEC_KEYS },
	{ "turboquant(bits=3,qjl=1)", KVP_CODEC_KEYS },
	{ "turboquant(bits=2,outliers=32,outlier_bits=3)", KVP_CODEC_KEYS },
	{ "kivi(bits=2)", KVP_CODEC_KEYS },
	{ "kivi(bits=4)", KVP_CODEC_KEYS },
	{ "kivi(bits=2)", KVP_CODEC_VALUES },
	{ "kivi(bits=4)", KVP_CODEC_VALUES },
	{ "spark(keep=0.5)", KVP_CODEC_KEYS },
	{ "spark(keep=0.5)|turboquant(bits=3)", KVP_CODEC_KEYS }, /* quantize=auto: rotated */
	{ "spark(keep=0.5,quantize=kept)|turboquant(bits=3)", KVP_CODEC_KEYS },
	{ "spark(keep=0.5,quantize=all)|turboquant(bits=3)", KVP_CODEC_KEYS },
};

struct work {
	const struct kvp_codec *c;
	void *ctx;
	unsigned n;
	const float *x, *q, *w;
	float *y, *out, *acc, *scores;
	void *bytes, *qprep;
	const uint16_t *h; /* fp16 rows for the dense baselines */
};

static void *xmalloc(size_t n)
{
	void *p = calloc(1, n ? n : 1);

	if (!p) {
		fprintf(stderr, "bench_codecs: out of memory\n");
		exit(1);
	}
	return p;
}

static void must(kvp_status st, const char *what)
{
	if (st != KVP_OK) {
		fprintf(stderr, "bench_codecs: %s: %s\n", what, kvp_last_error());
		exit(1);
	}
}

static void run_encode(void *arg)
{
	struct work *a = arg;
	must(a->c->ops->encode(a->c, a->ctx, a->n, a->x, a->bytes), "encode");
}

static void run_decode(void *arg)
{
	struct work *a = arg;
	must(a->c->ops->decode(a->c, a->ctx, a->n, a->bytes, a->y), "decode");
}

static void run_dot(void *arg)
{
	struct work *a = arg;
	a->c->ops->prepare_query(a->c, a->ctx, a->q, a->qprep);
	a->c->ops->dot(a->c, a->ctx, a->n, a->bytes, a->qprep, a->out);
}

static void run_axpy(void *arg)
{
	struct work *a = arg;
	memset(a->acc, 0, sizeof(float) * a->c->acc_dim);
	memset(a->out, 0, sizeof(float) * D);
	a->c->ops->axpy(a->c, a->ctx, a->n, a->bytes, a->w, a->acc);
	a->c->ops->finish(a->c, a->ctx, a->acc, a->out);
}

static void run_dot_f32(void *arg)
{
	struct work *a = arg;
	kvp_kernels()->dot_f32(D, a->n, a->x, a->q, 1.0f, a->out);
}

static void run_dot_f16(void *arg)
{
	struct work *a = arg;
	kvp_kernels()->dot_f16(D, a->n, a->h, a->q, 1.0f, a->out);
}

static void run_axpy_f32(void *arg)
{
	struct work *a = arg;
	memset(a->acc, 0, sizeof(float) * D);
	kvp_kernels()->axpy_f32(D, a->n, a->x, a->w, a->acc);
}

static void run_axpy_f16(void *arg)
{
	struct work *a = arg;
	memset(a->acc, 0, sizeof(float) * D);
	kvp_kernels()->axpy_f16(D, a->n, a->h, a->w, a->acc);
}

/* One head, one query: scores, one softmax over all of them, weighted sum. Keys and values share bytes. */
static void run_attend_codec(void *arg)
{
	struct work *a = arg;
	float m = -INFINITY, l = 0;

	a->c->ops->prepare_query(a->c, a->ctx, a->q, a->qprep);
	a->c->ops->dot(a->c, a->ctx, a->n, a->bytes, a->qprep, a->scores);
	kvp_kernels()->scale(a->n, 1.0f / sqrtf((float)D), a->scores);
	kvp_kernels()->softmax_step(a->n, a->scores, &m, &l);
	memset(a->acc, 0, sizeof(float) * a->c->acc_dim);
	memset(a->out, 0, sizeof(float) * D);
	a->c->ops->axpy(a->c, a->ctx, a->n, a->bytes, a->scores, a->acc);
	a->c->ops->finish(a->c, a->ctx, a->acc, a->out);
	kvp_kernels()->scale(D, 1.0f / l, a->out);
}

static void run_attend_f16(void *arg)
{
	struct work *a = arg;
	float m = -INFINITY, l = 0;

	kvp_kernels()->dot_f16(D, a->n, a->h, a->q, 1.0f / sqrtf((float)D), a->scores);
	kvp_kernels()->softmax_step(a->n, a->scores, &m, &l);
	memset(a->out, 0, sizeof(float) * D);
	kvp_kernels()->axpy_f16(D, a->n, a->h, a->scores, a->out);
	kvp_kernels()->scale(D, 1.0f / l, a->out);
}

static struct kvp_codec *open_spec(const struct spec *s)
{
	struct kvp_codec *c;

	must(kvp_codec_parse_role(s->text, strlen(s->text), D, s->role, &c), s->text);
	return c;
}

/* Encodes n vectors of x into a fresh work item (context fitted on them, no queries). */
static struct work prepare(struct kvp_codec *c, unsigned n, const float *x, const float *q, const float *w,
			   const uint16_t *h)
{
	struct work a = { c, NULL, n, x, q, w, NULL, NULL, NULL, NULL, NULL, NULL, h };

	a.ctx = c->ctx_bytes ? xmalloc(c->ctx_bytes) : NULL;
	if (a.ctx)
		must(c->ops->fit(c, a.ctx, n, x, 0, NULL), "fit");
	a.bytes = xmalloc(c->ops->bytes(c, n));
	a.y = xmalloc(sizeof(float) * (size_t)n * D);
	a.out = xmalloc(sizeof(float) * (n > D ? n : D));
	a.scores = xmalloc(sizeof(float) * n);
	a.acc = xmalloc(sizeof(float) * (c->acc_dim > D ? c->acc_dim : D));
	a.qprep = xmalloc(c->qprep_bytes);
	run_encode(&a);
	return a;
}

static void release(struct work *a)
{
	free(a->ctx), free(a->bytes), free(a->y), free(a->out), free(a->scores), free(a->acc), free(a->qprep);
}

static const char *label(const struct spec *s, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s%s", s->text, s->role == KVP_CODEC_VALUES ? " [values]" : "");
	return buf;
}

static void throughput(const float *x, int reps)
{
	double base_enc = 0, base_dec = 0;
	char name[96];

	bench_header("Encode and decode, 4096 vectors of d=128 (ns per vector; ratio to fp16 in this run)");
	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		struct kvp_codec *c = open_spec(&specs[i]);
		struct work a = prepare(c, N_CODE, x, NULL, NULL, NULL);
		double te = bench_time(run_encode, &a, reps), td = bench_time(run_decode, &a, reps);

		if (!strcmp(specs[i].text, "fp16")) {
			base_enc = te / N_CODE;
			base_dec = td / N_CODE;
		}
		label(&specs[i], name, sizeof name);
		printf("  %.2f bits/value\n", c->ops->bytes(c, N_CODE) * 8.0 / ((double)N_CODE * D));
		bench_row(name, "encode", te / N_CODE, base_enc ? base_enc : te / N_CODE, 1e9, "ns/vec", "fp16 encode");
		bench_row(name, "decode", td / N_CODE, base_dec ? base_dec : td / N_CODE, 1e9, "ns/vec", "fp16 decode");
		release(&a);
		kvp_codec_free(c);
	}
}

static void over_32k(const float *x, const float *q, const float *w, const uint16_t *h, int reps)
{
	struct work dense = { NULL, NULL, N_KEYS, x, q, w, NULL, xmalloc(sizeof(float) * N_KEYS), xmalloc(sizeof(float) * N_KEYS),
			      xmalloc(sizeof(float) * N_KEYS), NULL, NULL, h };
	double t32 = bench_time(run_dot_f32, &dense, reps), t16 = bench_time(run_dot_f16, &dense, reps);
	double a32 = bench_time(run_axpy_f32, &dense, reps), a16 = bench_time(run_axpy_f16, &dense, reps);
	double att16 = bench_time(run_attend_f16, &dense, reps);
	char name[96];

	bench_header("32K keys of d=128, one query (kernels: dense dot_f32/dot_f16, axpy_f32/axpy_f16)");
	bench_row("dense fp32 rows", "dot 32K", t32, t32, 1e3, "ms", "itself");
	bench_row("dense fp16 rows", "dot 32K", t16, t32, 1e3, "ms", "dot_f32");
	bench_row("dense fp32 rows", "axpy 32K", a32, a32, 1e3, "ms", "itself");
	bench_row("dense fp16 rows", "axpy 32K", a16, a32, 1e3, "ms", "axpy_f32");
	bench_row("dense fp16 rows", "attention 32K", att16, att16, 1e3, "ms", "itself");
	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		struct kvp_codec *c = open_spec(&specs[i]);
		struct work a = prepare(c, N_KEYS, x, q, w, h);
		double td = bench_time(run_dot, &a, reps), ta = bench_time(run_axpy, &a, reps);

		label(&specs[i], name, sizeof name);
		bench_row(name, "dot 32K", td, t32, 1e3, "ms", "dot_f32");
		bench_row(name, "dot 32K", td, t16, 1e3, "ms", "dot_f16");
		bench_row(name, "axpy 32K", ta, a32, 1e3, "ms", "axpy_f32");
		bench_row(name, "axpy 32K", ta, a16, 1e3, "ms", "axpy_f16");
		if (c->ops->bytes(c, N_KEYS) < (size_t)N_KEYS * D * 2)
			bench_row(name, "attention 32K", bench_time(run_attend_codec, &a, reps), att16, 1e3, "ms",
				  "fp16 attention");
		release(&a);
		kvp_codec_free(c);
	}
	free(dense.out), free(dense.acc), free(dense.scores);
}

enum { NKV = 8, GQA = 4 };

struct layer {
	struct kvp_codec *c;
	void *kb[NKV], *vb[NKV];       /* codec bytes per KV head */
	uint16_t *kh[NKV], *vh[NKV];   /* fp16 rows per KV head */
	float q[NKV * GQA][D], out[D], acc[2 * D], *scores;
	void *qprep;
};

static void attend_layer_codec(void *arg)
{
	struct layer *a = arg;
	const struct kvp_codec *c = a->c;

	for (unsigned g = 0; g < NKV; g++)
		for (unsigned h = g * GQA; h < (g + 1) * GQA; h++) {
			float m = -INFINITY, l = 0;
			c->ops->prepare_query(c, NULL, a->q[h], a->qprep);
			c->ops->dot(c, NULL, N_KEYS, a->kb[g], a->qprep, a->scores);
			kvp_kernels()->scale(N_KEYS, 1.0f / sqrtf((float)D), a->scores);
			kvp_kernels()->softmax_step(N_KEYS, a->scores, &m, &l);
			memset(a->acc, 0, sizeof(float) * c->acc_dim);
			memset(a->out, 0, sizeof a->out);
			c->ops->axpy(c, NULL, N_KEYS, a->vb[g], a->scores, a->acc);
			c->ops->finish(c, NULL, a->acc, a->out);
		}
}

static void attend_layer_f16(void *arg)
{
	struct layer *a = arg;

	for (unsigned g = 0; g < NKV; g++)
		for (unsigned h = g * GQA; h < (g + 1) * GQA; h++) {
			float m = -INFINITY, l = 0;
			kvp_kernels()->dot_f16(D, N_KEYS, a->kh[g], a->q[h], 1.0f / sqrtf((float)D), a->scores);
			kvp_kernels()->softmax_step(N_KEYS, a->scores, &m, &l);
			memset(a->out, 0, sizeof a->out);
			kvp_kernels()->axpy_f16(D, N_KEYS, a->vh[g], a->scores, a->out);
		}
}

/* Every KV head gets its own keys and values: x shifted by a head-dependent number of rows. */
static void layer_attention(const float *x, int reps)
{
	static const char *const codecs[] = { "turboquant(bits=3)", "turboquant(bits=4)", "turboquant(bits=2)",
					      "kivi(bits=2)" };
	struct layer a;
	float *rows = xmalloc(sizeof(float) * (size_t)N_KEYS * D);
	double t16;

	memset(&a, 0, sizeof a);
	a.scores = xmalloc(sizeof(float) * N_KEYS);
	for (unsigned h = 0; h < NKV * GQA; h++)
		memcpy(a.q[h], x + (size_t)(h * 13 + 5) * D, sizeof a.q[h]);
	for (unsigned g = 0; g < NKV; g++) {
		a.kh[g] = xmalloc(sizeof(uint16_t) * (size_t)N_KEYS * D);
		a.vh[g] = xmalloc(sizeof(uint16_t) * (size_t)N_KEYS * D);
		for (unsigned side = 0; side < 2; side++) {
			size_t shift = (size_t)(2 * g + side + 1) * 977 % N_KEYS * D, total = (size_t)N_KEYS * D;
			memcpy(rows, x + shift, sizeof(float) * (total - shift));
			memcpy(rows + (total - shift), x, sizeof(float) * shift);
			kvp_kernels()->f32_to_f16(total, rows, side ? a.vh[g] : a.kh[g]);
		}
	}
	bench_header("One layer's decode attention: 8 KV heads x 32K tokens, d=128, 32 query heads (GQA 4)");
	t16 = bench_time(attend_layer_f16, &a, reps);
	bench_row("dense fp16 K,V (128 MiB)", "attention", t16, t16, 1e3, "ms", "itself");
	for (size_t i = 0; i < sizeof codecs / sizeof codecs[0]; i++) {
		struct spec s = { codecs[i], KVP_CODEC_KEYS };
		char name[96];

		a.c = open_spec(&s);
		a.qprep = xmalloc(a.c->qprep_bytes);
		for (unsigned g = 0; g < NKV; g++) {
			a.kb[g] = xmalloc(a.c->ops->bytes(a.c, N_KEYS));
			a.vb[g] = xmalloc(a.c->ops->bytes(a.c, N_KEYS));
			kvp_kernels()->f16_to_f32((size_t)N_KEYS * D, a.kh[g], rows);
			must(a.c->ops->encode(a.c, NULL, N_KEYS, rows, a.kb[g]), "encode");
			kvp_kernels()->f16_to_f32((size_t)N_KEYS * D, a.vh[g], rows);
			must(a.c->ops->encode(a.c, NULL, N_KEYS, rows, a.vb[g]), "encode");
		}
		snprintf(name, sizeof name, "%s (%.0f MiB)", codecs[i],
			 2.0 * NKV * a.c->ops->bytes(a.c, N_KEYS) / (1 << 20));
		bench_row(name, "attention", bench_time(attend_layer_codec, &a, reps), t16, 1e3, "ms",
			  "dense fp16 attention");
		for (unsigned g = 0; g < NKV; g++)
			free(a.kb[g]), free(a.vb[g]);
		free(a.qprep);
		kvp_codec_free(a.c);
	}
	for (unsigned g = 0; g < NKV; g++)
		free(a.kh[g]), free(a.vh[g]);
	free(a.scores);
	free(rows);
}

int main(void)
{
	int reps = bench_reps(5);
	float *x = xmalloc(sizeof(float) * (size_t)N_KEYS * D), *q = xmalloc(sizeof(float) * D);
	float *w = xmalloc(sizeof(float) * N_KEYS);
	uint16_t *h = xmalloc(sizeof(uint16_t) * (size_t)N_KEYS * D);
	uint64_t s = 42;

	for (size_t i = 0; i < (size_t)N_KEYS * D; i++) { /* N(0,1) by Box-Muller on an LCG */
		double u1, u2;
		s = s * 6364136223846793005ull + 1442695040888963407ull;
		u1 = ((double)(s >> 11) + 1.0) * 0x1p-53;
		s = s * 6364136223846793005ull + 1442695040888963407ull;
		u2 = (double)(s >> 11) * 0x1p-53;
		x[i] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
	}
	memcpy(q, x + 7 * D, sizeof(float) * D);
	for (unsigned i = 0; i < N_KEYS; i++)
		w[i] = 1.0f / N_KEYS;
	kvp_kernels()->f32_to_f16((size_t)N_KEYS * D, x, h);
	printf("kernels: %s\n", kvp_kernels()->name);
	throughput(x, reps);
	over_32k(x, q, w, h, reps);
	layer_attention(x, reps);
	free(x), free(q), free(w), free(h);
	return 0;
}
