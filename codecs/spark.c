/*
 * spark(keep=K, recover=avg|zero, quantize=auto|kept|all|rotated), default keep=0.5, recover=avg, quantize=auto: SparK
 * (Liao et al., arXiv 2508.15212),
 * per-token unstructured pruning of key channels. Separable, group 1; may stand left of '|' so the kept
 * values go to a quantizer: "spark(keep=0.5)|turboquant(bits=3)". Alone, the kept values are fp16.
 *
 * Per token, of D channels, T = D - floor((1 - K) * D) are kept: those with the largest score
 * k_j^2 * ||Q_j|| (ties to the lower index), where ||Q_j|| is the L2 norm of channel j over the observed
 * queries that fit() was given (the pager passes the last 32 queries of the stream's prefill); without
 * queries ||Q_j|| = 1. A channel whose ||Q_j|| is below 1e-6 of the largest is given that floor, so the
 * recovery below stays finite.
 *
 * recover=avg (the reference's default): s = mean over the pruned channels of k_j^2 * ||Q_j||, and a pruned
 * channel decodes as sign(k_j) * sqrt(s / ||Q_j||) (the reference keeps the original sign). recover=zero
 * decodes pruned channels as 0 and stores neither s nor signs.
 *
 * K lies in (0, 1]. The issue names 0.5..1.0; the reference runs prune 50% and 80% (keep 0.5 and 0.2) and
 * the issue's own test compares keep=0.5 with keep=0.25, so any fraction leaving at least one channel is
 * accepted.
 *
 * Layout of one token (P = D - T pruned channels):
 *   float32 sqrt(s)                recover=avg only: the pruned channels' common scale, stored as the root
 *                                  that decoding and the integer path multiply by (one sqrt per token at
 *                                  encode instead of one per token and query)
 *   keep mask, D bits              bit j set when channel j is kept, LSB first, padded to a byte
 *   signs, P bits                  recover=avg only: of the pruned channels in ascending order, 1 = negative
 *   kept values                    the T kept values in ascending channel order: inner codec bytes(1) of a
 *                                  vector of T floats, or T fp16 values alone, then starting on an even
 *                                  byte (one zero byte of padding when the fields before end on an odd one)
 *   bytes(n) = n * (4*avg + ceil(D/8) + avg*ceil(P/8) [+ pad] + inner_bytes(T) or 2T)
 * d=128, keep=0.5, recover=avg: 4 + 16 + 8 + 128 = 156 bytes (9.75 bits per value) alone;
 * with |turboquant(bits=3) the kept part is 4 + 24 bytes: 56 bytes, 3.5 bits per value. No padding at
 * d=128 (or any d that is a multiple of 16).
 *
 * quantize=all (stacked only): the inner codec, opened for D channels, takes the whole vector as SparK
 * decodes it (kept values, pruned ones recovered as below, or 0), and a token is the inner codec's bytes
 * alone: no s, mask or signs (SparK's choice lives in the values). decode, dot and axpy are the inner
 * codec's, so a rotating quantizer scores every token against one prepared query (qprep and acc_dim are
 * the inner codec's). d=128 with |turboquant(bits=3): 52 bytes, 3.25 bits per value. Measured on kjv-64
 * (kvpager-ab, 512 steps, block=16,sinks=4,window=16, v=turboquant(bits=3)): next-token KL 1.13e-3
 * against 1.28e-3 for quantize=kept, at 92% of its bytes per token; turboquant(bits=3) keys alone: 8.7e-4.
 * (When quantize=kept still rotated each token back, a layer at 32K tokens took 3.7x the fp16 cache's time
 * and quantize=all 0.98x; see the query paths below.) At d=64 neither pays over TurboQuant alone: the mask,
 * signs and s (16 bytes) outweigh the kept=0.5 codes saved (12 bytes at 3 bits), and kjv-2k and kjv-64 move
 * less with turboquant(bits=3) or (bits=4) keys than with SparK over either (README, codecs).
 *
 * quantize=rotated (stacked over turboquant at bits 1..3): SparK in TurboQuant's rotated basis, with a
 * format and query paths of its own, in codecs/spark_rotated.c: open hands the codec there after parsing.
 *
 * quantize=auto (the default): rotated where the codec right of '|' takes it (kvp_spark_rotated_takes: one
 * Hadamard pass over at most 3-bit codes at the full width) and a channel is pruned, kept otherwise (alone,
 * over fp16, kivi's values, turboquant at bits=4 or with qjl or outliers, a width not a power of two, keep=1).
 * The rotated layout measured better on every axis here: fewer bytes (kjv-2k 687 against 762 a token),
 * less KL (2.43e-4 against 3.65e-4), and attention at 32K tokens in 0.44-0.57x the fp16 cache's time where
 * the kept layout takes 0.79-1.05x (README). quantize=kept stays SparK's reference, query statistics and all.
 * Where the rotated basis can be at all (a power-of-two width, keep < 1) the inner codec is opened at the full
 * width first, and again at the kept width if auto settles on kept (turboquant at bits=4, with qjl or outliers).
 *
 * The inner codec must be separable with group 1 (each token's kept channels differ, so a codec grouping
 * tokens or channels across tokens has nothing consistent to group): kivi on keys is rejected.
 * The context holds ||Q_j|| and 1/sqrt(||Q_j||) per channel, then the inner codec's context, if any,
 * fitted on the kept vectors (quantize=all: on the recovered vectors). fit() uses the queries of the
 * last 32 decode steps (fit_steps); the pager keeps them per stream until the stream's first block turns
 * cold.
 *
 * Query paths: decode, dot and axpy take tokens in chunks of 1024 floats of dense rows (at least one
 * token), which the codec's scratch holds with the chunk's kept values. A chunk's kept values are
 * widened from fp16, or decoded by one call of the inner codec on a copy of the chunk's inner records
 * placed side by side, then the kernel mask_expand places them and the recovered pruned values
 * (sign * sqrt(s) * 1/sqrt(||Q_j||)) into dense rows, and the dense kernels dot_f32 and axpy_f32 run on
 * those rows: once per head, so axpy_group expands each token once for a whole GQA group. dot is this float
 * path, the reference (acc_dim = D).
 *
 * dot_group, attention's path, scores keys in integers when the inner codec's tokens decode as one Hadamard
 * pass over int8 codes (hadamard_codes: TurboQuant without QJL or outliers; kept a power of two up to 64,
 * recover=avg). The algebra: with z = sgn .* H lut8[codes] the token's kept values are A * z, A = norm *
 * unit8 / sqrt(T), so score = sum over kept j of q_j * A * z_rank(j) + sum over pruned j of q_j * sign_j *
 * sqrt(s) * rq_j. Both sums are over the token's dense row x (kept lanes z, pruned lanes sign * rq_j *
 * sqrt(s) / A on the same integer grid), so one int16 row per token serves every head of the group: the
 * kernel spark_dot_i16_group builds it once (the T-point transform in int16 registers, a few adds and
 * shuffles, where the float path rotated each token back and expanded it in floats) and the heads take it
 * together (AVX-512: d/8 vpdpwssd with the four heads in the lanes). The query is prepared once per head: int16 on a step that keeps d * 32767 * |q| in int32,
 * and rho_j = rq_j / max rq in int16, so that a token's pruned value is (rho_j * ell + 2^14) >> 15 with
 * ell = sqrt(s) * max rq / (A / 2^shift) rounded per token, sixteen tokens per vectorized step from the
 * stored sqrt(s) (the prepared query grows to 8 bytes per channel; a token's bytes do not change). Its scores differ from dot's by the
 * query's int16 rounding and the pruned values' rounding to the grid (TurboQuant decodes to its int8 codebook):
 * about 0.2% of the scores' spread, and at 32K tokens the attention output stays within 2e-3 of attention
 * over the decoded keys (tests/test_attend.c). A chunk whose ell would pass 32767 takes the float path.
 * At 32K tokens (GQA 4, values turboquant(bits=3)) a layer took 3.6x the fp16 cache's time before and
 * 0.99-1.11x with it on a quiet machine, then about 3.4x its bandwidth floor once the AVX-512 kernel ran in
 * passes with the heads in the lanes, and 0.69-0.75x (d=128; 2.6-3.1x the floor) with the kernel's z pass
 * on vpdpbusd and TurboQuant's 8-bit-weight values (README's Known limits).
 *
 * Encode: the scores' bits are int32 keys, and the kernel spark_choose finds the kept-th largest bit by bit
 * and writes the mask, the pruned signs and the kept values (AVX-512: the keys in registers, vcompressps and
 * pext; 1.0-1.1 us a token at d=128 before it, 0.17-0.24 us with it; AVX2 0.4 us). The bytes are those of
 * the plain loops before it (a quickselect per token and a branch per channel, 4-8x slower still).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/kernels.h"

struct spark {
	unsigned kept, pruned, avg;
	size_t mask_at, sign_at, kept_at, stride;
	size_t kept_bytes; /* inner bytes(1), or 2 * kept */
	unsigned all;      /* quantize=all: the inner codec takes the whole recovered vector */
	/* the integer group path (spark_dot_i16_group), when the inner codec's codes are Hadamard ones */
	unsigned fast;
	struct kvp_masked_codes rows; /* its rho is each call's, from the prepared query */
	size_t norm_at;               /* the inner norm's byte in a token */
	float unit;                   /* the inner codebook's int8 step over sqrt(kept) and 2^shift */
	int8_t sgn[64];
};

static const char *const recover_modes[] = { "zero", "avg", NULL };
static const char *const quantize_modes[] = { "kept", "all", "rotated", "auto", NULL };
enum { QUANTIZE_KEPT, QUANTIZE_ALL, QUANTIZE_ROTATED, QUANTIZE_AUTO };

/* *mode: QUANTIZE_*. */
static kvp_status parse(struct kvp_args *args, unsigned dim, unsigned *kept, unsigned *avg, unsigned *mode)
{
	double keep = 0.5; /* the reference runs prune 50% (and 80%) */
	unsigned recover = 1;
	kvp_status st;

	*mode = QUANTIZE_AUTO;
	if ((st = kvp_args_double(args, "keep", 0.0, 1.0, &keep)) != KVP_OK ||
	    (st = kvp_args_choice(args, "recover", recover_modes, &recover)) != KVP_OK ||
	    (st = kvp_args_choice(args, "quantize", quantize_modes, mode)) != KVP_OK)
		return st;
	/* the epsilon keeps keep=0.7 at d=10 from losing a channel to 0.3*10 = 3.0000000000000004 */
	*kept = dim - (unsigned)floor((1.0 - keep) * dim + 1e-9);
	if (*kept == 0)
		return kvp_fail(KVP_EINVAL, "spark: keep=%g keeps no channel of %u", keep, dim);
	*avg = recover;
	return KVP_OK;
}

/* quantize=auto's mode over inner, as opened at the width spark_inner_dim settled on. */
static unsigned settle(unsigned mode, unsigned kept, unsigned dim, const struct kvp_codec *inner)
{
	if (mode != QUANTIZE_AUTO)
		return mode;
	return inner && kept < dim && kvp_spark_rotated_takes(inner, dim) ? QUANTIZE_ROTATED : QUANTIZE_KEPT;
}

/* quantize=auto asks for the full width first (rotated's) where the rotated basis can be at all (a channel
 * pruned, a power-of-two width: no inner codec is opened twice elsewhere), then, shown the inner codec, settles. */
static kvp_status spark_inner_dim(struct kvp_args *args, unsigned dim, const struct kvp_codec *inner, unsigned *out)
{
	unsigned kept, avg, mode;
	kvp_status st = parse(args, dim, &kept, &avg, &mode);

	if (st != KVP_OK)
		return st;
	if (mode == QUANTIZE_AUTO && !inner)
		mode = kept < dim && !(dim & (dim - 1)) ? QUANTIZE_ROTATED : QUANTIZE_KEPT;
	else
		mode = settle(mode, kept, dim, inner);
	*out = mode == QUANTIZE_KEPT ? kept : dim;
	return KVP_OK;
}

/* Tokens decoded per pass of the query paths: their dense rows (and kept values) stay in L1, and the
 * codec's scratch small. */
#define CHUNK_FLOATS 1024

static unsigned chunk_tokens(unsigned dim)
{
	return dim < CHUNK_FLOATS ? CHUNK_FLOATS / dim : 1;
}

/*
 * The scratch, for one call at a time. Encode and fit: a token's channel keys (dim), its kept values
 * (dim floats: the branchless gather writes every channel, and only the first `kept` stay), its mask
 * (dim bytes) and the kept values in fp16 (kept). The query paths: a chunk's dense rows, its kept values
 * and its recovery scales.
 */
struct spark_scratch {
	int32_t *key;
	float *y;
	unsigned char *keep, *mask; /* a channel per byte (quantize=all's recovery), and as bits */
	uint16_t *half;
	float *rows, *kept, *scale;
	unsigned char *codes; /* a chunk's inner records, side by side, for one inner decode */
};

static size_t scratch_layout(unsigned dim, unsigned kept, size_t kept_bytes, void *base, struct spark_scratch *w)
{
	const size_t chunk = chunk_tokens(dim);
	size_t encode = (sizeof(int32_t) + sizeof(float)) * dim + sizeof(uint16_t) * kept + dim + (dim + 7) / 8;
	size_t query = sizeof(float) * chunk * (dim + kept + 1) + chunk * kept_bytes;

	if (base) {
		w->key = base;
		w->y = (float *)(w->key + dim);
		w->half = (uint16_t *)(w->y + dim);
		w->keep = (unsigned char *)(w->half + kept);
		w->mask = w->keep + dim;
		w->rows = base;
		w->kept = w->rows + chunk * dim;
		w->scale = w->kept + chunk * kept;
		w->codes = (unsigned char *)(w->scale + chunk);
	}
	return encode > query ? encode : query;
}

static size_t spark_scratch_bytes(unsigned dim, unsigned kept, size_t kept_bytes)
{
	return scratch_layout(dim, kept, kept_bytes, NULL, NULL);
}

static struct spark_scratch scratch_of(const struct kvp_codec *c)
{
	const struct spark *s = c->state;
	struct spark_scratch w;

	scratch_layout(c->dim, s->kept, c->inner ? s->kept_bytes : 0, c->scratch, &w);
	return w;
}

/*
 * The integer group path (spark_dot_i16_group) needs the inner codec's tokens to decode as one Hadamard pass
 * over int8 codes (TurboQuant, no QJL, no outliers), kept a power of two up to 64, recover=avg and d up to
 * 256. The shift puts the transformed codes (at most 127 * kept) just under 2^15.
 */
static void open_fast(struct kvp_codec *c, struct spark *s, struct kvp_codec *inner)
{
	struct kvp_hadamard_codes hc;

	s->fast = 0;
	if (!inner || s->all || !s->avg || !s->pruned || c->dim > 256 || s->kept > 64 || (s->kept & (s->kept - 1)) ||
	    s->kept < 2 || !inner->ops->hadamard_codes || !inner->ops->hadamard_codes(inner, &hc))
		return;
	s->fast = 1;
	s->rows = (struct kvp_masked_codes){ .d = c->dim, .kept = s->kept, .bits = hc.bits, .stride = s->stride,
					     .mask_at = s->mask_at, .sign_at = s->sign_at,
					     .code_at = s->kept_at + hc.code_at, .lut = hc.lut, .sgn = s->sgn };
	while ((127u * s->kept) << (s->rows.shift + 1) <= 32767u)
		s->rows.shift++;
	for (unsigned r = 0; r < s->kept; r++)
		s->sgn[r] = hc.sign[r] < 0.0f ? -1 : 1;
	s->norm_at = s->kept_at + hc.norm_at;
	s->unit = hc.unit / sqrtf((float)s->kept) / (float)(1u << s->rows.shift);
}

static kvp_status spark_open(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner)
{
	struct spark *s;
	unsigned kept, avg, mode, all;
	kvp_status st = parse(args, dim, &kept, &avg, &mode);

	if (st != KVP_OK)
		return st;
	mode = settle(mode, kept, dim, inner);
	if (mode != QUANTIZE_KEPT && !inner)
		return kvp_fail(KVP_EINVAL, "spark: quantize=%s needs a codec right of '|' to quantize the vector",
				quantize_modes[mode]);
	if (mode == QUANTIZE_ROTATED)
		return kvp_spark_rotated_open(c, kept, avg, inner);
	all = mode == QUANTIZE_ALL;
	if (inner && (!(inner->flags & KVP_CODEC_SEPARABLE) || inner->group != 1))
		return kvp_fail(KVP_EINVAL, "spark: the codec right of '|' (%s, group %u) is not separable; SparK's "
				"kept channels differ per token", inner->ops->name, inner->group);
	s = kvp_allocate(&c->mem, sizeof *s, "spark: its configuration");
	if (!s)
		return KVP_ENOMEM;
	s->kept = kept;
	s->pruned = dim - kept;
	s->avg = avg;
	s->mask_at = avg ? sizeof(float) : 0;
	s->sign_at = s->mask_at + (dim + 7) / 8;
	s->kept_at = s->sign_at + (avg ? (s->pruned + 7) / 8 : 0);
	if (!inner)
		s->kept_at += s->kept_at & 1; /* fp16 values on a 2-byte boundary: widened in place */
	s->kept_bytes = inner ? inner->ops->bytes(inner, 1) : 2 * (size_t)kept;
	s->stride = s->kept_at + s->kept_bytes;
	s->all = all;
	if (all)
		s->stride = s->kept_bytes;
	c->state = s;
	c->ctx_bytes = 2 * sizeof(float) * dim + (inner ? inner->ctx_bytes : 0);
	c->qprep_bytes = sizeof(float) * dim;
	c->scratch_bytes = spark_scratch_bytes(dim, kept, inner ? s->kept_bytes : 0);
	c->acc_dim = dim;
	c->fit_steps = 32; /* the reference's observation window */
	if (all) {
		c->qprep_bytes = inner->qprep_bytes;
		c->acc_dim = inner->acc_dim;
	}
	open_fast(c, s, inner);
	if (s->fast)
		c->qprep_bytes = (sizeof(float) * (dim + 2) + 2 * sizeof(int16_t) * dim + 15) / 16 * 16;
	return KVP_OK;
}

static void spark_close(struct kvp_codec *c)
{
	kvp_release(&c->mem, c->state, sizeof(struct spark));
	c->state = NULL;
}

static size_t spark_bytes(const struct kvp_codec *c, unsigned n)
{
	const struct spark *s = c->state;

	return s->stride * n;
}

static void *inner_ctx(const struct kvp_codec *c, const void *ctx)
{
	return c->inner && c->inner->ctx_bytes ? (char *)ctx + 2 * sizeof(float) * c->dim : NULL;
}

/* 1 / sqrt(||Q_j||) per channel, after ||Q_j|| in the context: a pruned channel's factor. */
static const float *rq_of(const struct kvp_codec *c, const void *ctx)
{
	return (const float *)ctx + c->dim;
}

/* ---- Channel selection. ---- */

/*
 * Channels go through these loops in runs of RUN: a loop of a constant count is one the compiler
 * vectorizes at -O2 (gcc's cheap cost model takes no loop of unknown count), and the rest of a vector
 * takes the plain loop after it.
 */
#define RUN 16

/*
 * A channel's rank key: the bits of its score k_j^2 * ||Q_j||. Scores are >= 0 and never NaN (x is finite
 * and ||Q_j|| > 0; an overflow is +inf), so their bits order as they do, as int32 below 2^31.
 */
static void score_run(const float *restrict qn, const float *restrict x, int32_t *restrict key, unsigned n)
{
	for (unsigned j = 0; j < n; j++) {
		float score = x[j] * x[j] * qn[j];
		memcpy(key + j, &score, sizeof score);
	}
}

static void score_keys(unsigned dim, const float *qn, const float *x, int32_t *key)
{
	unsigned j = 0;

	for (; j + RUN <= dim; j += RUN)
		score_run(qn + j, x + j, key + j, RUN);
	score_run(qn + j, x + j, key + j, dim - j);
}

/*
 * The token's choice of channels (the kernel spark_choose): its mask bits and, unless signs is NULL, its pruned
 * channels' signs written, its kept values to y (room for dim floats). Returns the recovery scalar s (0 when
 * nothing is pruned). key is room for dim keys.
 */
static float select_channels(const struct kvp_codec *c, const float *qn, const float *x, int32_t *key,
			     unsigned char *mask, unsigned char *signs, float *y)
{
	const struct spark *s = c->state;
	double pruned;

	score_keys(c->dim, qn, x, key);
	pruned = kvp_kernels()->spark_choose(c->dim, s->kept, key, x, mask, signs, y);
	return s->pruned ? (float)(pruned / s->pruned) : 0.0f;
}

/* The mask's bits a channel per byte, for recover() below. */
static void unpack_mask(unsigned dim, const unsigned char *mask, unsigned char *keep)
{
	for (unsigned j = 0; j < dim; j++)
		keep[j] = mask[j >> 3] >> (j & 7) & 1;
}

/* A run of recover(): bit operations, so the run is vectorized and nothing branches on the data. */
static void recover_run(const unsigned char *restrict keep, float scale, uint32_t sign, const float *restrict rq,
			const float *restrict x, float *restrict z, unsigned n)
{
	for (unsigned j = 0; j < n; j++) {
		float a = scale * rq[j];
		uint32_t xb, ab, m = 0u - (uint32_t)keep[j], zb;

		memcpy(&xb, x + j, sizeof xb);
		memcpy(&ab, &a, sizeof ab);
		zb = (xb & m) | ((ab | (xb & sign)) & ~m);
		memcpy(z + j, &zb, sizeof zb);
	}
}

/* quantize=all: the vector as SparK decodes it, kept channels as they are and the pruned ones recovered
 * (x's sign on sqrt(s) * 1/sqrt(||Q_j||), the product rounded as mask_expand rounds it), or +0. */
static void recover(const struct kvp_codec *c, const void *ctx, const unsigned char *keep, float sbar,
		    const float *x, float *z)
{
	const struct spark *s = c->state;
	const float *rq = rq_of(c, ctx);
	const float scale = s->avg ? sqrtf(sbar) : 0.0f;
	const uint32_t sign = s->avg ? 0x80000000u : 0u;
	unsigned j = 0;

	for (; j + RUN <= c->dim; j += RUN)
		recover_run(keep + j, scale, sign, rq + j, x + j, z + j, RUN);
	recover_run(keep + j, scale, sign, rq + j, x + j, z + j, c->dim - j);
}

/* ---- Per-stream context: the query channel norms. ---- */

static kvp_status spark_fit(const struct kvp_codec *c, void *ctx, unsigned n, const float *x, unsigned nq,
			    const float *q)
{
	const struct spark *s = c->state;
	const struct spark_scratch w = scratch_of(c);
	float *qn = ctx, top = 0.0f;
	float *kept;
	unsigned m;
	kvp_status st;

	for (unsigned j = 0; j < c->dim; j++) {
		double n2 = 0.0;
		for (unsigned i = 0; i < nq; i++)
			n2 += (double)q[(size_t)i * c->dim + j] * q[(size_t)i * c->dim + j];
		qn[j] = (float)sqrt(n2);
		top = fmaxf(top, qn[j]);
	}
	for (unsigned j = 0; j < c->dim; j++) {
		qn[j] = top > 0.0f && isfinite(top) ? fmaxf(qn[j], 1e-6f * top) : 1.0f;
		qn[c->dim + j] = 1.0f / sqrtf(qn[j]);
	}
	if (!c->inner || !c->inner->ctx_bytes)
		return KVP_OK;
	m = s->all ? c->dim : s->kept;
	kept = kvp_allocate_array(&c->mem, (size_t)m * n, sizeof(float), "spark: kept channels to fit on");
	if (!kept)
		return KVP_ENOMEM;
	for (unsigned i = 0; i < n; i++) {
		const float *xi = x + (size_t)i * c->dim;
		float sbar = select_channels(c, qn, xi, w.key, w.mask, NULL, w.y);

		if (s->all) {
			unpack_mask(c->dim, w.mask, w.keep);
			recover(c, ctx, w.keep, sbar, xi, kept + (size_t)i * m);
		} else {
			memcpy(kept + (size_t)i * m, w.y, sizeof(float) * m);
		}
	}
	st = c->inner->ops->fit(c->inner, inner_ctx(c, ctx), n, kept, 0, NULL);
	kvp_release(&c->mem, kept, (size_t)m * n * sizeof(float));
	return st;
}

/* ---- Encode and decode. ---- */

static float load16(const unsigned char *p)
{
	return kvp_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

static kvp_status encode_kept(const struct kvp_codec *c, const void *ctx, const float *y, uint16_t *half,
			      unsigned char *dst)
{
	const struct spark *s = c->state;

	if (c->inner)
		return c->inner->ops->encode(c->inner, inner_ctx(c, ctx), 1, y, dst);
	kvp_kernels()->f32_to_f16(s->kept, y, half);
	memcpy(dst, half, sizeof *half * s->kept);
	return KVP_OK;
}

static kvp_status spark_encode(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst)
{
	const struct spark *s = c->state;
	const struct spark_scratch w = scratch_of(c);
	unsigned char *p = dst;

	for (unsigned i = 0; i < n; i++, p += s->stride, x += c->dim) {
		float sbar;
		kvp_status st;

		if (kvp_first_outside(x, c->dim, INFINITY) < c->dim)
			return kvp_fail(KVP_EINVAL, "spark: token %u has a non-finite value", i);
		if (s->all) {
			sbar = select_channels(c, ctx, x, w.key, w.mask, NULL, w.y);
			unpack_mask(c->dim, w.mask, w.keep);
			recover(c, ctx, w.keep, sbar, x, w.y);
			st = c->inner->ops->encode(c->inner, inner_ctx(c, ctx), 1, w.y, p);
			if (st != KVP_OK)
				return st;
			continue;
		}
		memset(p, 0, s->kept_at);
		sbar = select_channels(c, ctx, x, w.key, p + s->mask_at, s->avg && s->pruned ? p + s->sign_at : NULL, w.y);
		if (s->avg) {
			float root = sqrtf(sbar);

			memcpy(p, &root, sizeof root);
		}
		st = encode_kept(c, ctx, w.y, w.half, p + s->kept_at);
		if (st != KVP_OK)
			return st;
	}
	return KVP_OK;
}

/* The recovery scale sqrt(s) of a token (0 with recover=zero). */
static float load_root(const struct spark *s, const unsigned char *p)
{
	float v = 0.0f;

	if (s->avg)
		memcpy(&v, p, sizeof v);
	return v;
}

/*
 * Whether a token's mask keeps exactly `kept` channels, as every encoded token does. The expand kernel
 * reads as many kept values as the mask has bits, so bytes that were never encoded (a caller's garbage)
 * must not reach it; such a token decodes as zeros.
 */
static int mask_is_sound(const struct kvp_codec *c, const unsigned char *mask)
{
	const struct spark *s = c->state;

	return kvp_mask_count(c->dim, mask) == s->kept;
}

/* Each token's mask keeps `kept` channels and its scale is what encode writes; the inner codec checks
 * the kept values (quantize=all: the whole token). */
static kvp_status spark_check(const struct kvp_codec *c, unsigned n, const void *src)
{
	const struct spark *s = c->state;
	const unsigned char *p = src;

	if (s->all)
		return kvp_codec_check(c->inner, n, src);
	for (unsigned i = 0; i < n; i++, p += s->stride) {
		if (s->avg && !kvp_codec_scale_ok(kvp_load_f32(p)))
			return kvp_fail(KVP_ECORRUPT, "spark: token %u's pruned scale is %g, not a finite number >= 0", i,
					(double)kvp_load_f32(p));
		if (!mask_is_sound(c, p + s->mask_at))
			return kvp_fail(KVP_ECORRUPT, "spark: token %u's keep mask does not keep %u channels", i, s->kept);
		if (c->inner && kvp_codec_check(c->inner, 1, p + s->kept_at) != KVP_OK)
			return kvp_fail_context(KVP_ECORRUPT, "spark: token %u's kept values", i);
	}
	return KVP_OK;
}

/* The kept values of token p, widened from fp16 (spark alone). */
static void load_fp16(const struct kvp_codec *c, const unsigned char *p, float *y)
{
	const struct spark *s = c->state;
	const unsigned char *v = p + s->kept_at;

	if (((uintptr_t)v & 1) == 0) {
		kvp_kernels()->f16_to_f32(s->kept, (const uint16_t *)(const void *)v, y);
	} else {
		for (unsigned t = 0; t < s->kept; t++)
			y[t] = load16(v + 2 * t);
	}
}

/* Expands tokens [from, to) of a chunk whose kept values and recovery scales are in place. */
static void expand_run(const struct kvp_codec *c, const void *ctx, const unsigned char *p, unsigned from,
		       unsigned to, const float *kept, const float *scale, float *x)
{
	const struct spark *s = c->state;

	if (from == to)
		return;
	p += (size_t)from * s->stride;
	kvp_kernels()->mask_expand(c->dim, to - from, p + s->mask_at, s->avg ? p + s->sign_at : NULL, s->stride,
				   kept + (size_t)from * s->kept, s->kept, scale + from, rq_of(c, ctx),
				   x + (size_t)from * c->dim);
}

/* n <= chunk_tokens tokens of p, decoded into x ([n][dim]), which may be the scratch's rows. */
static void decode_chunk(const struct kvp_codec *c, const void *ctx, unsigned n, const unsigned char *p, float *x)
{
	const struct spark *s = c->state;
	const struct spark_scratch w = scratch_of(c);
	float *kept = w.kept, *scale = w.scale;
	unsigned from = 0;

	if (c->inner) {
		/* the chunk's inner records side by side: one call of the inner decode for all of them */
		for (unsigned i = 0; i < n; i++)
			memcpy(w.codes + i * s->kept_bytes, p + (size_t)i * s->stride + s->kept_at, s->kept_bytes);
		c->inner->ops->decode(c->inner, inner_ctx(c, ctx), n, w.codes, kept);
	}
	for (unsigned i = 0; i < n; i++) {
		const unsigned char *tok = p + (size_t)i * s->stride;

		if (!mask_is_sound(c, tok + s->mask_at)) {
			expand_run(c, ctx, p, from, i, kept, scale, x);
			memset(x + (size_t)i * c->dim, 0, sizeof(float) * c->dim);
			from = i + 1;
			continue;
		}
		if (!c->inner)
			load_fp16(c, tok, kept + (size_t)i * s->kept);
		scale[i] = load_root(s, tok);
	}
	expand_run(c, ctx, p, from, n, kept, scale, x);
}

static kvp_status spark_decode(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x)
{
	const struct spark *s = c->state;
	const unsigned step = chunk_tokens(c->dim);

	if (s->all)
		return c->inner->ops->decode(c->inner, inner_ctx(c, ctx), n, src, x);
	for (unsigned i = 0; i < n; i += step)
		decode_chunk(c, ctx, n - i < step ? n - i : step, (const unsigned char *)src + (size_t)i * s->stride,
			     x + (size_t)i * c->dim);
	return KVP_OK;
}

/* ---- Query paths: a chunk is expanded to dense rows once, then the dense kernels run on it. ---- */

/*
 * The prepared query of the integer path: the float query (what dot, the reference, reads), then the query
 * in int16 on a step of its own, rho (the pruned channels' 1/sqrt(||Q_j||) in int16 on the step rq_top /
 * 32767), the query's step and rq_top. The query's range keeps every sum in int32: d * 32767 * range < 2^31.
 */
struct spark_query {
	float *f;
	int16_t *q16, *rho;
	float *step, *rq_top;
};

static struct spark_query spark_query_at(const struct kvp_codec *c, const void *qprep)
{
	struct spark_query q;

	q.f = (float *)qprep;
	q.q16 = (int16_t *)(q.f + c->dim);
	q.rho = q.q16 + c->dim;
	q.step = (float *)(q.rho + c->dim);
	q.rq_top = q.step + 1;
	return q;
}

static void prepare_integers(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	const struct spark_query out = spark_query_at(c, qprep);
	const float range = (float)(2147483647u / (c->dim * 32767u));
	const float *rq = rq_of(c, ctx);
	float top = 0.0f, rq_top = 0.0f, inv;

	/* comparisons, not fmaxf (a libm call per channel here): a NaN loses either way */
	for (unsigned j = 0; j < c->dim; j++) {
		top = fabsf(q[j]) > top ? fabsf(q[j]) : top;
		rq_top = rq[j] > rq_top ? rq[j] : rq_top;
	}
	inv = top > range / 3.0e38f ? range / top : 0.0f; /* no infinite factor for tiny queries */
	for (unsigned j = 0; j < c->dim; j++) {
		out.q16[j] = (int16_t)kvp_nearest(q[j] * inv);
		out.rho[j] = (int16_t)kvp_nearest(rq[j] / rq_top * 32767.0f);
	}
	memcpy(out.step, &(float){ top / range }, sizeof(float));
	memcpy(out.rq_top, &rq_top, sizeof rq_top);
}

static void spark_prepare_query(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep)
{
	const struct spark *s = c->state;

	if (s->all) {
		c->inner->ops->prepare_query(c->inner, inner_ctx(c, ctx), q, qprep);
		return;
	}
	memcpy(qprep, q, sizeof(float) * c->dim);
	if (s->fast)
		prepare_integers(c, ctx, q, qprep);
}

/* quantize=all: the inner codec's own group paths, or its single-head ones once per head. */
static void inner_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			    const void *qprep, float *out, size_t out_stride)
{
	const struct kvp_codec *in = c->inner;

	if (in->ops->dot_group) {
		in->ops->dot_group(in, inner_ctx(c, ctx), n, src, g, qprep, out, out_stride);
		return;
	}
	for (unsigned h = 0; h < g; h++)
		in->ops->dot(in, inner_ctx(c, ctx), n, src, (const char *)qprep + h * in->qprep_bytes,
			     out + h * out_stride);
}

static void inner_axpy_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			     const float *w, size_t w_stride, float *acc)
{
	const struct kvp_codec *in = c->inner;

	if (in->ops->axpy_group) {
		in->ops->axpy_group(in, inner_ctx(c, ctx), n, src, g, w, w_stride, acc);
		return;
	}
	for (unsigned h = 0; h < g; h++)
		in->ops->axpy(in, inner_ctx(c, ctx), n, src, w + h * w_stride, acc + (size_t)h * in->acc_dim);
}

/* The float path: each chunk decoded to dense rows once, then the dense dot once per head. out holds g rows
 * of out_stride. */
static void dense_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			    const void *qprep, float *out, size_t out_stride)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct spark *s = c->state;
	const unsigned step = chunk_tokens(c->dim);
	float *x = scratch_of(c).rows;

	for (unsigned i = 0; i < n; i += step) {
		unsigned cn = n - i < step ? n - i : step;

		decode_chunk(c, ctx, cn, (const unsigned char *)src + (size_t)i * s->stride, x);
		for (unsigned h = 0; h < g; h++)
			kern->dot_f32(c->dim, cn, x, (const float *)((const char *)qprep + h * c->qprep_bytes), 1.0f,
				      out + h * out_stride + i);
	}
}

/*
 * Tokens per call of the integer kernel. A chunk takes the float path instead when one of its tokens has a
 * recovery too large for int16 beside its kept values (ell above 32767: a channel whose ||Q_j|| is
 * thousands of times below the largest) or a zero norm. A token whose mask the encoder did not write scores
 * 0 in the kernel, as it decodes to zeros.
 */
#define FAST_CHUNK 128

/* Tokens per step of fast_scalars: a loop of a constant count, which the compiler vectorizes (see RUN). */
#define SCALAR_RUN 16
_Static_assert(FAST_CHUNK % SCALAR_RUN == 0, "fast_scalars fills whole runs of tokens");

/* ell (as a float) and the row scale of SCALAR_RUN tokens from their roots sqrt(s) and inner norms; nonzero
 * when one of them has an ell too large for int16 (or not a number: a zero norm). No branch and no select
 * in the loop, so that it vectorizes. */
static unsigned scalars_run(float k, float unit, const float *restrict root, const float *restrict norm,
			    float *restrict l, float *restrict row_scale)
{
	unsigned bad = 0;

	for (unsigned i = 0; i < SCALAR_RUN; i++) {
		float scale = norm[i] * unit;

		l[i] = root[i] * k / scale;
		bad |= !(l[i] <= 32767.0f);
		row_scale[i] = scale;
	}
	return bad;
}

/* ell rounded, once every l of the run is known to fit. */
static void ell_run(const float *restrict l, int16_t *restrict ell)
{
	for (unsigned i = 0; i < SCALAR_RUN; i++)
		ell[i] = (int16_t)(int32_t)(l[i] + 0.5f);
}

/* The tokens' ell and row scales (spark_dot_i16_group), or 0 when the chunk must take the float path. ell
 * and row_scale have room for n rounded up to SCALAR_RUN. */
static int fast_scalars(const struct kvp_codec *c, unsigned n, const unsigned char *p, float rq_top, int16_t *ell,
			float *row_scale)
{
	const struct spark *s = c->state;
	const float k = rq_top * (32768.0f / 32767.0f);

	for (unsigned i = 0; i < n; i += SCALAR_RUN) {
		float root[SCALAR_RUN], norm[SCALAR_RUN], l[SCALAR_RUN];

		/* past n the run repeats token i, whose results nobody reads */
		for (unsigned t = 0; t < SCALAR_RUN; t++) {
			const unsigned char *tok = p + (size_t)(i + t < n ? i + t : i) * s->stride;

			root[t] = kvp_load_f32(tok);
			norm[t] = kvp_load_f32(tok + s->norm_at);
		}
		if (scalars_run(k, s->unit, root, norm, l, row_scale + i))
			return 0;
		ell_run(l, ell + i);
	}
	return 1;
}

/*
 * Attention's path. With Hadamard-coded kept values (spark|turboquant): the integer kernel, each token
 * decoded once for the group and nothing rotated back; its scores differ from dot's (the float inner product
 * with the decoded vector) by the int8 codebook's rounding (as TurboQuant's own group path), the query's
 * rounding to int16 and the pruned values' rounding to the integer grid of the kept ones: tests/test_spark.c
 * bounds the attention output's error against the decoded keys. Otherwise the float path.
 */
static void spark_dot_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			    const void *qprep, float *out, size_t out_stride)
{
	const struct spark *s = c->state;
	int16_t ell[FAST_CHUNK];
	float row_scale[FAST_CHUNK], head_scale[KVP_CODEC_GROUP_MAX];
	struct kvp_masked_codes rows;

	if (s->all) {
		inner_dot_group(c, ctx, n, src, g, qprep, out, out_stride);
		return;
	}
	if (!s->fast) {
		dense_dot_group(c, ctx, n, src, g, qprep, out, out_stride);
		return;
	}
	rows = s->rows;
	rows.rho = spark_query_at(c, qprep).rho;
	for (unsigned h = 0; h < g; h++)
		head_scale[h] = *spark_query_at(c, (const char *)qprep + h * c->qprep_bytes).step;
	for (unsigned i = 0; i < n; i += FAST_CHUNK) {
		const unsigned cn = n - i < FAST_CHUNK ? n - i : FAST_CHUNK;
		const unsigned char *p = (const unsigned char *)src + (size_t)i * s->stride;

		if (fast_scalars(c, cn, p, *spark_query_at(c, qprep).rq_top, ell, row_scale))
			kvp_kernels()->spark_dot_i16_group(&rows, cn, p, ell, row_scale, g, spark_query_at(c, qprep).q16,
							   c->qprep_bytes / sizeof(int16_t), head_scale, out + i, out_stride);
		else
			dense_dot_group(c, ctx, cn, p, g, qprep, out + i, out_stride);
	}
}

/* One head: with quantize=all the inner codec's own dot, which its group path approximates (TurboQuant's
 * runs on integers), so that dot stays the inner product with the decoded vector; the float path otherwise,
 * which the integer group path approximates likewise. */
static void spark_dot(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		      float *out)
{
	const struct spark *s = c->state;

	if (s->all)
		c->inner->ops->dot(c->inner, inner_ctx(c, ctx), n, src, qprep, out);
	else
		dense_dot_group(c, ctx, n, src, 1, qprep, out, n);
}

static void spark_axpy_group(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			     const float *w, size_t w_stride, float *acc)
{
	const struct kvp_kernels *kern = kvp_kernels();
	const struct spark *s = c->state;
	const unsigned step = chunk_tokens(c->dim);
	float *x = scratch_of(c).rows;

	if (s->all) {
		inner_axpy_group(c, ctx, n, src, g, w, w_stride, acc);
		return;
	}
	for (unsigned i = 0; i < n; i += step) {
		unsigned cn = n - i < step ? n - i : step;

		decode_chunk(c, ctx, cn, (const unsigned char *)src + (size_t)i * s->stride, x);
		for (unsigned h = 0; h < g; h++)
			kern->axpy_f32(c->dim, cn, x, w + h * w_stride + i, acc + (size_t)h * c->acc_dim);
	}
}

static void spark_axpy(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		       float *acc)
{
	const struct spark *s = c->state;

	if (s->all)
		c->inner->ops->axpy(c->inner, inner_ctx(c, ctx), n, src, w, acc);
	else
		spark_axpy_group(c, ctx, n, src, 1, w, n, acc);
}

static void spark_finish(const struct kvp_codec *c, const void *ctx, const float *acc, float *out)
{
	const struct spark *s = c->state;

	if (s->all) {
		c->inner->ops->finish(c->inner, inner_ctx(c, ctx), acc, out);
		return;
	}
	for (unsigned j = 0; j < c->dim; j++)
		out[j] += acc[j];
}

const struct kvp_codec_ops kvp_codec_spark = {
	.name = "spark",
	.flags = KVP_CODEC_SEPARABLE | KVP_CODEC_STACKS,
	.inner_dim = spark_inner_dim,
	.open = spark_open,
	.bytes = spark_bytes,
	.fit = spark_fit,
	.encode = spark_encode,
	.decode = spark_decode,
	.check = spark_check,
	.prepare_query = spark_prepare_query,
	.dot = spark_dot,
	.axpy = spark_axpy,
	.dot_group = spark_dot_group,
	.axpy_group = spark_axpy_group,
	.finish = spark_finish,
	.close = spark_close,
};
