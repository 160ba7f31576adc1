/*
 * codecs/ — encodings of token vectors, behind one vtable, looked up by name from a spec string.
 *
 * A codec turns n vectors of `dim` floats into codec_bytes(n) bytes and works on those bytes directly:
 * dot() scores a query against encoded keys, axpy() accumulates weighted encoded values. A configured
 * struct kvp_codec is immutable after open and may be shared by many streams and threads.
 *
 * Per-stream parameters (TurboQuant's outlier channels, SparK's query channel norms) live in a context
 * of ctx_bytes bytes that the owner of the stream keeps once and passes to every call; fit() fills it
 * from the stream's first group of vectors (and the queries observed so far, when the codec uses them).
 * Codecs without per-stream parameters have ctx_bytes == 0 and get ctx == NULL.
 */
#ifndef KVP_CODEC_H
#define KVP_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* Each token's bytes stand alone at a fixed stride: a block can be compacted by moving bytes. */
#define KVP_CODEC_SEPARABLE 1u
/* May stand left of '|': hands a reduced vector down to the next codec of the stack. */
#define KVP_CODEC_STACKS 2u

struct kvp_codec;

struct kvp_codec_ops {
	const char *name;
	unsigned flags;
	/* Parse args (every key must be looked up; kvp_args_finish is called by the registry), set c->group,
	 * c->ctx_bytes, c->qprep_bytes, c->acc_dim and c->state. inner is the rest of a stack or NULL. */
	kvp_status (*open)(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner);
	size_t (*bytes)(const struct kvp_codec *c, unsigned n); /* n a multiple of c->group */
	/* Fill ctx from n >= group vectors and nq observed queries (q may be NULL when nq == 0). */
	void (*fit)(const struct kvp_codec *c, void *ctx, unsigned n, const float *x, unsigned nq,
		    const float *q);
	kvp_status (*encode)(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst);
	kvp_status (*decode)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x);
	/* qprep: qprep_bytes of scratch filled once per query, then used by dot over many blocks */
	void (*prepare_query)(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep);
	/* out[i] = <q, decode(x_i)> for i < n (no 1/sqrt(d) scaling) */
	void (*dot)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		    float *out);
	/* acc[0..acc_dim) += sum_i w[i] * (x_i in the codec's accumulation space) */
	void (*axpy)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		     float *acc);
	/* out[0..dim) += acc mapped back from the accumulation space (e.g. the inverse rotation) */
	void (*finish)(const struct kvp_codec *c, const void *ctx, const float *acc, float *out);
	void (*close)(struct kvp_codec *c);
};

struct kvp_codec {
	const struct kvp_codec_ops *ops;
	unsigned dim;
	unsigned group;       /* tokens per group; 1 when separable */
	size_t ctx_bytes;     /* per-stream context, 0 when none */
	size_t qprep_bytes;   /* scratch for prepare_query */
	unsigned acc_dim;     /* floats of the axpy accumulator */
	void *state;          /* the codec's own configuration */
	struct kvp_codec *inner;
	/* standalone use (kvp_codec_* public calls): the context fitted on the first encode */
	void *own_ctx;
	int own_ctx_fitted;
};

/* Parse spec[0..len) ("fp16", "turboquant(bits=3)", "spark(keep=0.5)|turboquant(bits=3)") for vectors
 * of dim floats. The codec is allocated with malloc; kvp_codec_free releases it. */
kvp_status kvp_codec_parse(const char *spec, size_t len, unsigned dim, struct kvp_codec **out);
void kvp_codec_free(struct kvp_codec *c);

#endif /* KVP_CODEC_H */
