/*
 * libFuzzer target for reading codes: whatever bytes n tokens of a codec hold, kvp_codec_decode and
 * kvp_codec_dot must refuse them (KVP_ECORRUPT: codes no encoder writes) or read them without a crash or a
 * read past the tokens; and bytes they take are then safe for attention's group paths (dot_group and
 * axpy_group for four heads, the integer kernels), which read what the remote tier installs once its
 * check has passed. Built and run by `make fuzz`; the first input byte picks the codec
 * (tests/fuzz_codec_table.h), the rest is read as whole groups of tokens, at most FUZZ_CODEC_TOKENS.
 */
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kvpager.h"
#include "tests/fuzz_codec_table.h"

#define HEADS 4

static kvp_codec *codec[FUZZ_CODECS];

/* Each codec once, its context fitted by a first encode, as a standalone codec's is. */
static void codecs_open(void)
{
	static float x[FUZZ_CODEC_TOKENS * 128];
	static unsigned char bytes[FUZZ_CODEC_TOKENS * 512];

	for (size_t i = 0; i < FUZZ_CODECS; i++) {
		uint32_t n = FUZZ_CODEC_TOKENS;
		if (!(codec[i] = fuzz_codec_encoded(i, &n, x, bytes, sizeof bytes)))
			abort();
	}
}

/* Attention's paths over codes the public calls took: four heads' scores, then values weighted evenly. */
static void group_paths(kvp_codec *c, unsigned n, const unsigned char *codes, const float *q)
{
	char *qprep = malloc(HEADS * (c->qprep_bytes ? c->qprep_bytes : 1));
	float *scores = malloc(sizeof(float) * HEADS * n), *acc = calloc((size_t)HEADS * c->acc_dim, sizeof(float));

	if (!qprep || !scores || !acc)
		abort();
	for (unsigned h = 0; h < HEADS; h++)
		c->ops->prepare_query(c, c->own_ctx, q + (size_t)h * c->dim, qprep + h * c->qprep_bytes);
	if (c->ops->dot_group)
		c->ops->dot_group(c, c->own_ctx, n, codes, HEADS, qprep, scores, n);
	for (unsigned i = 0; i < HEADS * n; i++)
		scores[i] = 1.0f / (float)n;
	if (c->ops->axpy_group)
		c->ops->axpy_group(c, c->own_ctx, n, codes, HEADS, scores, n, acc);
	free(qprep), free(scores), free(acc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kvp_codec *c;
	size_t group_bytes, bytes;
	unsigned n;
	unsigned char *codes;
	float *x, *out, *q;
	kvp_status st;

	if (!codec[0])
		codecs_open();
	if (size < 1)
		return 0;
	c = codec[data[0] % FUZZ_CODECS];
	group_bytes = kvp_codec_bytes(c, c->group);
	n = (unsigned)((size - 1) / group_bytes * c->group);
	n = n > FUZZ_CODEC_TOKENS ? FUZZ_CODEC_TOKENS : n;
	if (n == 0)
		return 0;
	/* buffers of exactly their size, so a read past them is the sanitizer's to see */
	bytes = kvp_codec_bytes(c, n);
	codes = malloc(bytes);
	x = malloc(sizeof(float) * n * c->dim);
	out = malloc(sizeof(float) * n);
	q = malloc(sizeof(float) * HEADS * c->dim);
	if (!codes || !x || !out || !q)
		abort();
	memcpy(codes, data + 1, bytes);
	fuzz_codec_vectors(HEADS, c->dim, q);
	st = kvp_codec_decode(c, n, codes, x);
	if (st != KVP_OK && st != KVP_ECORRUPT)
		abort();
	if (st == KVP_OK) {
		if (kvp_codec_dot(c, n, codes, q, out) != KVP_OK)
			abort(); /* the same bytes, the same check */
		group_paths(c, n, codes, q);
	}
	free(codes), free(x), free(out), free(q);
	return 0;
}
