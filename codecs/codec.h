/*
 * codecs/ — encodings of token vectors, behind one vtable, looked up by name from a spec string.
 *
 * A codec turns n vectors of `dim` floats into codec_bytes(n) bytes and works on those bytes directly:
 * dot() scores a query against encoded keys, axpy() accumulates weighted encoded values. A configured
 * struct kvp_codec does not change after open (its scratch aside) and may serve many streams, but not two
 * calls at once: each codec works in scratch of its own (below), so calls on one codec must not overlap.
 * The pager parses codecs per sequence, whose calls the host serializes.
 *
 * Scratch: vectors of up to KVP_CODEC_DIM_MAX floats would not fit on a small thread stack (musl gives
 * 128 KiB; no frame of the library may take more than 16 KiB, `make stack`), so a codec's working arrays
 * live in c->scratch: scratch_bytes that open() asks for, allocated once by the registry from c->mem
 * (charged to the tenant like the codec's tables), so the query paths allocate nothing per call.
 *
 * Per-stream parameters (TurboQuant's outlier channels, SparK's query channel norms) live in a context
 * of ctx_bytes bytes that the owner of the stream keeps once and passes to every call; fit() fills it
 * from the stream's first group of vectors (and the queries observed so far, when the codec uses them).
 * Codecs without per-stream parameters have ctx_bytes == 0 and get ctx == NULL.
 */
#ifndef KVP_CODEC_H
#define KVP_CODEC_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "kernels/kernels.h"

/* Each token's bytes stand alone at a fixed stride: a block can be compacted by moving bytes. */
#define KVP_CODEC_SEPARABLE 1u
/* May stand left of '|': hands a vector down to the next codec of the stack (reduced, like SparK's kept
 * channels, or transformed at the same width, like spark(quantize=all)'s recovered vector). */
#define KVP_CODEC_STACKS 2u
/* Takes a bit width as bits= and offers with_bits, so a ladder can open it at each of its levels' widths. */
#define KVP_CODEC_BITS 4u

/* Which side of the cache a codec encodes. Codecs whose reference layout differs between keys and values
 * take their default from it (KIVI: keys per channel, values per token); an explicit argument wins. */
#define KVP_CODEC_KEYS 0u
#define KVP_CODEC_VALUES 1u

/* Most query heads a group path (dot_group, axpy_group) is handed at once. */
#define KVP_CODEC_GROUP_MAX 128u

/* Largest vector a codec takes. */
#define KVP_CODEC_DIM_MAX 4096u

struct kvp_codec;

/*
 * Consecutive blocks of one stream read as one (axpy_span): n tokens, block b holding tokens [b * run,
 * b * run + run) of them at src[b]; run is a multiple of KVP_CODEC_SPAN_RUN, every block but the last
 * holds run tokens, and n <= KVP_CODEC_SPAN_TOKENS.
 */
#define KVP_CODEC_SPAN_BLOCKS 4u
#define KVP_CODEC_SPAN_RUN 16u
#define KVP_CODEC_SPAN_TOKENS 256u

struct kvp_code_span {
	unsigned n, run;
	const void *src[KVP_CODEC_SPAN_BLOCKS];
};

/* What hadamard_codes describes (in struct kvp_codec_ops). */
struct kvp_hadamard_codes {
	unsigned bits;
	size_t norm_at, code_at;
	const int8_t *lut;
	float unit;
	const float *sign;
};

struct kvp_codec_ops {
	const char *name;
	unsigned flags; /* what every instance can do; struct kvp_codec.flags is what this one does */
	/* STACKS codecs only (NULL otherwise): the dimension handed to the next codec of the stack for
	 * vectors of dim floats. Reads the same args as open. The registry calls it with inner NULL, opens
	 * the next codec at *out, then calls it again with that codec: a codec whose mode follows what its
	 * inner codec can do (spark(quantize=auto)) may then name another width, at which the registry opens
	 * the next codec again before open. */
	kvp_status (*inner_dim)(struct kvp_args *args, unsigned dim, const struct kvp_codec *inner, unsigned *out);
	/* KVP_CODEC_BITS codecs only (NULL otherwise): args as open will read them for a width of `bits`
	 * (decimal text that outlives args), in place of any width they hold; the other arguments stay. */
	kvp_status (*with_bits)(struct kvp_args *args, const char *bits);
	/* Parse args (every key must be looked up; kvp_args_finish is called by the registry), set c->group,
	 * c->ctx_bytes, c->qprep_bytes, c->scratch_bytes, c->acc_dim and c->state. inner is the rest of a
	 * stack, already opened with the dimension inner_dim() returned, or NULL. The registry frees inner
	 * and the scratch; close() releases only state.
	 * On entry c->flags == ops->flags, c->group == 1 and c->role is set; open may clear flags, and may point
	 * c->ops at ops of a mode of its own (spark(quantize=rotated)), whose calls, close included, follow. */
	kvp_status (*open)(struct kvp_codec *c, struct kvp_args *args, unsigned dim, struct kvp_codec *inner);
	size_t (*bytes)(const struct kvp_codec *c, unsigned n); /* n a multiple of c->group */
	/* Fill ctx from n >= group vectors and nq observed queries (q may be NULL when nq == 0).
	 * NULL for codecs with ctx_bytes == 0. Fails only with KVP_ENOMEM (a stack fits its inner codec). */
	kvp_status (*fit)(const struct kvp_codec *c, void *ctx, unsigned n, const float *x, unsigned nq,
			  const float *q);
	kvp_status (*encode)(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x, void *dst);
	kvp_status (*decode)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, float *x);
	/*
	 * Optional: whether the bytes of n tokens (n a multiple of group) are ones encode writes, for bytes
	 * that come from outside the process (the remote tier): its norms and scales finite and >= 0, a
	 * keep mask of the kept count. KVP_ECORRUPT naming the token and the field otherwise. NULL: every byte
	 * pattern is one encode writes for some input (fp16, fp32). Reads no context.
	 */
	kvp_status (*check)(const struct kvp_codec *c, unsigned n, const void *src);
	/* qprep: qprep_bytes of scratch filled once per query, then used by dot over many blocks */
	void (*prepare_query)(const struct kvp_codec *c, const void *ctx, const float *q, void *qprep);
	/* out[i] = <q, decode(x_i)> for i < n (no 1/sqrt(d) scaling) */
	void (*dot)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const void *qprep,
		    float *out);
	/* acc[0..acc_dim) += sum_i w[i] * (x_i in the codec's accumulation space) */
	void (*axpy)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, const float *w,
		     float *acc);
	/*
	 * Optional: dot and axpy for the g query heads of a GQA group at once, so each code is unpacked
	 * once for the group. Head h's prepared query is at qprep + h * c->qprep_bytes; head h's n scores go
	 * to out + h * out_stride and its n weights are read at w + h * w_stride (strides >= n); acc holds g
	 * rows of c->acc_dim, g <= KVP_CODEC_GROUP_MAX. NULL: callers run dot and axpy once per head.
	 * Attention's fast path: it may approximate dot and axpy (TurboQuant's runs on the integer kernels),
	 * within a bound its codec states and tests; dot and axpy stay the float reference.
	 */
	void (*dot_group)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			  const void *qprep, float *out, size_t out_stride);
	void (*axpy_group)(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src, unsigned g,
			   const float *w, size_t w_stride, float *acc);
	/*
	 * Optional, with axpy_group: axpy_group over the consecutive blocks of a span as over one block of
	 * span->n tokens (w: g rows of w_stride >= span->n). It may differ from axpy_group on each block in
	 * turn as much as axpy_group may differ from axpy: TurboQuant's weights share one 8-bit step over the
	 * whole span, where each block's call pays for its own step and its own sums. ahead (NULL: none): what
	 * the caller reads next, asked for while the values are summed. NULL: callers take axpy_group per block.
	 */
	void (*axpy_span)(const struct kvp_codec *c, const void *ctx, const struct kvp_code_span *span, unsigned g,
			  const float *w, size_t w_stride, float *acc, const struct kvp_ahead *ahead);
	/*
	 * Optional (NULL otherwise): whether every token decodes as norm * (1/sqrt(dim)) * sign .* H (lut[code] *
	 * unit), H the unnormalized Walsh-Hadamard transform of size dim (a power of two), norm the float at
	 * byte norm_at of the token and code the `bits`-bit codes at code_at (packed as for the lut kernels),
	 * with lut the codec's int8 codebook; sign holds dim floats of +1 or -1. Fills *out and returns 1 when
	 * so (TurboQuant with one rotation pass, no QJL, no outliers), 0 otherwise. A stack scores such
	 * codes in integers without rotating each token back (SparK's kept values).
	 */
	int (*hadamard_codes)(const struct kvp_codec *c, struct kvp_hadamard_codes *out);
	/* out[0..dim) += acc mapped back from the accumulation space (e.g. the inverse rotation) */
	void (*finish)(const struct kvp_codec *c, const void *ctx, const float *acc, float *out);
	void (*close)(struct kvp_codec *c);
};

struct kvp_codec {
	const struct kvp_codec_ops *ops;
	unsigned dim;
	unsigned flags;       /* KVP_CODEC_*: ops->flags, refined by open (kivi(axis=channel) is not separable) */
	unsigned role;        /* KVP_CODEC_KEYS or KVP_CODEC_VALUES, as given to kvp_codec_parse_role */
	unsigned group;       /* tokens per group; 1 when separable */
	size_t ctx_bytes;     /* per-stream context, 0 when none */
	size_t qprep_bytes;   /* scratch for prepare_query */
	unsigned acc_dim;     /* floats of the axpy accumulator */
	unsigned fit_steps;   /* decode steps of observed queries fit() can use (SparK: 32); 0: none */
	size_t scratch_bytes; /* working memory any call may use, set by open; 0 when none */
	void *scratch;        /* scratch_bytes from mem, allocated by the registry after open */
	void *state;          /* the codec's own configuration, from mem */
	struct kvp_allocator mem; /* where this struct, state and the codec's buffers come from */
	struct kvp_codec *inner;
	/* standalone use (kvp_codec_* public calls): the context fitted on the first encode */
	void *own_ctx;
	int own_ctx_fitted;
};

/* Parse spec[0..len) ("fp16", "turboquant(bits=3)", "spark(keep=0.5)|turboquant(bits=3)") for vectors
 * of dim floats. The codec is allocated on the C heap (kvp_codec_parse_in: from mem, which the pager
 * points at the sequence's tenant, so a codec's tables are charged like its blocks); kvp_codec_free
 * releases it. */
kvp_status kvp_codec_parse(const char *spec, size_t len, unsigned dim, struct kvp_codec **out);
/* The same for one side of the cache (KVP_CODEC_KEYS or KVP_CODEC_VALUES); kvp_codec_parse means keys.
 * The pager parses v= with KVP_CODEC_VALUES, so "kivi(bits=2)" quantizes values per token. */
kvp_status kvp_codec_parse_role(const char *spec, size_t len, unsigned dim, unsigned role,
				struct kvp_codec **out);
kvp_status kvp_codec_parse_in(const char *spec, size_t len, unsigned dim, unsigned role,
			      const struct kvp_allocator *mem, struct kvp_codec **out);
void kvp_codec_free(struct kvp_codec *c);

/*
 * A spec parsed once (the pager's tenant parses k= and v= when it opens) into its stack of (codec ops,
 * arguments): opening it for a sequence repeats no lookup, and a ladder opens it at other bit widths
 * without rewriting text. The spec owns a copy of its text; kvp_codec_spec_free releases it. Names and
 * argument syntax are checked here; argument values when a codec is opened.
 */
struct kvp_codec_spec;
kvp_status kvp_codec_spec_parse(const char *text, size_t len, struct kvp_codec_spec **out);
void kvp_codec_spec_free(struct kvp_codec_spec *spec);
const char *kvp_codec_spec_text(const struct kvp_codec_spec *spec);
/* How many codecs of the stack take bits (KVP_CODEC_BITS). */
unsigned kvp_codec_spec_bits_members(const struct kvp_codec_spec *spec);
/* Opens the stack as kvp_codec_parse_in would; bits > 0 sets that width on every member that takes bits
 * (through its with_bits), bits == 0 opens it as written. Messages quote the spec at that width. */
kvp_status kvp_codec_spec_open(const struct kvp_codec_spec *spec, unsigned bits, unsigned dim, unsigned role,
			       const struct kvp_allocator *mem, struct kvp_codec **out);
/* The spec's text at a width (as kvp_codec_spec_open reads it): members that take bits are written
 * name(bits=N,<their other arguments>), the others as given. KVP_EINVAL when it needs cap bytes or more,
 * without a message (callers write it while reporting another fault). */
kvp_status kvp_codec_spec_write(const struct kvp_codec_spec *spec, unsigned bits, char *out, size_t cap);
/* The registry's codec names that have every flag of `flags`, joined by ", " (for messages). */
void kvp_codec_names(unsigned flags, char *out, size_t cap);
/* The with_bits of the codecs that take their width as bits=. Inline, so that such a codec's file does not
 * call back into the registry that lists it. */
static inline kvp_status kvp_codec_bits_arg(struct kvp_args *args, const char *bits)
{
	return kvp_args_put(args, "bits", bits);
}

/* A rotated query in int8 for the integer lookups (lut_dot_i8_group): q8[j] = nearest(x[j] * 127 / max |x|);
 * returns the step (x ~ q8 * step). */
static inline float kvp_codec_query_i8(const float *x, unsigned m, int8_t *q8)
{
	float top = 0.0f, inv;

	for (unsigned j = 0; j < m; j++)
		top = fabsf(x[j]) > top ? fabsf(x[j]) : top;
	inv = top > 127.0f / 3.0e38f ? 127.0f / top : 0.0f; /* no infinite factor for tiny queries */
	for (unsigned j = 0; j < m; j++)
		q8[j] = (int8_t)kvp_nearest(x[j] * inv);
	return top / 127.0f;
}

/* ops->check, or KVP_OK for a codec that has none. */
static inline kvp_status kvp_codec_check(const struct kvp_codec *c, unsigned n, const void *src)
{
	return c->ops->check ? c->ops->check(c, n, src) : KVP_OK;
}

/* A norm or a scale as encoders write them: finite and >= 0 (NaN fails both comparisons). */
static inline int kvp_codec_scale_ok(float v)
{
	return v >= 0.0f && v <= FLT_MAX;
}

/* The codecs of the registry (codecs/registry.c). */
extern const struct kvp_codec_ops kvp_codec_fp32;
extern const struct kvp_codec_ops kvp_codec_fp16;
extern const struct kvp_codec_ops kvp_codec_turboquant;
extern const struct kvp_codec_ops kvp_codec_kivi;
extern const struct kvp_codec_ops kvp_codec_spark;

/* spark(quantize=rotated) (codecs/spark_rotated.c): spark.c's open hands a codec of that mode here, which
 * points c->ops at the mode's own ops (named "spark" as well), so that no call of the mode goes through a
 * test of it. kept channels of c->dim, recover=avg when avg; inner is the codec right of '|'. */
kvp_status kvp_spark_rotated_open(struct kvp_codec *c, unsigned kept, unsigned avg, struct kvp_codec *inner);
/* Whether kvp_spark_rotated_open takes inner for c->dim = dim channels (quantize=auto's choice; the open
 * says why not). */
int kvp_spark_rotated_takes(const struct kvp_codec *inner, unsigned dim);
extern const struct kvp_codec_ops kvp_spark_rotated_ops;

/* TurboQuant's scalar reference encoder and decoder, outside the vtable: its fast paths give the same
 * bytes and floats, which tests/test_turboquant.c checks against these. */
kvp_status kvp_turboquant_encode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x,
					   void *dst);
kvp_status kvp_turboquant_decode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src,
					   float *x);

/* KIVI's scalar reference encoder and decoder: its fast paths give the same bytes and floats, which
 * tests/test_kivi.c checks against these. */
kvp_status kvp_kivi_encode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const float *x,
				     void *dst);
kvp_status kvp_kivi_decode_reference(const struct kvp_codec *c, const void *ctx, unsigned n, const void *src,
				     float *x);

/* Dense bit streams, least significant bit first: a field of w <= 8 bits at bit offset o of p. Writers
 * start from zeroed bytes. A field never touches a byte past its own last bit. */
static inline void kvp_bits_put(uint8_t *p, size_t o, unsigned w, unsigned v)
{
	unsigned s = (unsigned)(o & 7);
	p += o >> 3;
	p[0] |= (uint8_t)(v << s);
	if (s + w > 8)
		p[1] |= (uint8_t)(v >> (8 - s));
}

static inline unsigned kvp_bits_get(const uint8_t *p, size_t o, unsigned w)
{
	unsigned s = (unsigned)(o & 7), v;
	p += o >> 3;
	v = (unsigned)p[0] >> s;
	if (s + w > 8)
		v |= (unsigned)p[1] << (8 - s);
	return v & ((1u << w) - 1);
}

#endif /* KVP_CODEC_H */
