/*
 * The codecs fuzz_codec reads bytes with (an input's first byte picks one) and the vectors each one's
 * context is fitted on, shared with seed_corpus, which writes tokens each of them encoded.
 */
#ifndef KVP_TESTS_FUZZ_CODEC_TABLE_H
#define KVP_TESTS_FUZZ_CODEC_TABLE_H

#include <math.h>

#include "kvpager.h"

struct fuzz_codec {
	const char *spec;
	unsigned dim;
};

/* Dimensions that are not powers of two or not whole bytes of bits take the codecs' odd paths. */
static const struct fuzz_codec fuzz_codecs[] = {
	{ "turboquant(bits=3)", 64 },
	{ "turboquant(bits=2,qjl=1)", 48 },
	{ "turboquant(bits=2,outliers=8,outlier_bits=4)", 40 },
	{ "kivi(bits=2)", 64 },
	{ "kivi(bits=4,axis=token,group=16)", 40 },
	{ "spark(keep=0.5)", 20 },
	{ "spark(keep=0.5,quantize=kept)|turboquant(bits=3)", 128 },
	{ "spark(keep=0.25,recover=zero)|turboquant(bits=4)", 64 },
	{ "spark(keep=0.5,quantize=all)|turboquant(bits=3)", 32 },
	{ "fp16", 24 },
	{ "spark(keep=0.5,quantize=rotated)|turboquant(bits=3)", 64 },
};

#define FUZZ_CODECS (sizeof fuzz_codecs / sizeof fuzz_codecs[0])
#define FUZZ_CODEC_TOKENS 64 /* the most tokens one input is read as (two of KIVI's key groups) */

/* Token i's vector: smooth, with a louder channel every seventh, as keys have. */
static inline void fuzz_codec_vectors(unsigned n, unsigned dim, float *x)
{
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = 0; j < dim; j++)
			x[(size_t)i * dim + j] = sinf(0.37f * (float)(i * dim + j)) * (j % 7 == 3 ? 4.0f : 1.0f);
}

/* Codec i opened, with *n tokens of the vectors above (*n raised to one group when it is less) encoded
 * into bytes[0..cap), which fits a context on them as a standalone codec's first encode does; NULL when
 * it does not open or they do not fit. x has room for the tokens. */
static inline kvp_codec *fuzz_codec_encoded(size_t i, uint32_t *n, float *x, unsigned char *bytes, size_t cap)
{
	kvp_codec *c;

	if (kvp_codec_open(fuzz_codecs[i].spec, fuzz_codecs[i].dim, &c) != KVP_OK)
		return NULL;
	*n = *n < kvp_codec_group(c) ? kvp_codec_group(c) : *n;
	fuzz_codec_vectors(*n, fuzz_codecs[i].dim, x);
	if (kvp_codec_bytes(c, *n) > cap || kvp_codec_encode(c, *n, x, bytes) != KVP_OK) {
		kvp_codec_close(c);
		return NULL;
	}
	return c;
}

#endif
