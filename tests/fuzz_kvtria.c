/*
 * libFuzzer target for the .kvtria reader: any file must be read back or refused with a message, never
 * crash or read past its end. The input is written to a private file that kvp_tria_stats_read opens,
 * checked against a shape that matches the header's, so the fuzzer reaches the statistics themselves.
 * Built and run by `make fuzz`, seeded with valid files the library wrote (tests/corpus/fuzz_kvtria, from
 * tests/seed_corpus.c): the reader refuses any file whose size is not exactly what its header implies,
 * which random bytes almost never are.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "policies/policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint32_t u32_at(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char path[64];
	struct kvp_tria_stats st;
	kvp_shape shape = { 1, 1, 1, 8, 1e4f, KVP_ROPE_HALF };
	FILE *f;

	if (!path[0])
		snprintf(path, sizeof path, "/tmp/kvp-fuzz-%ld.kvtria", (long)getpid());
	if (!(f = fopen(path, "wb")))
		return 0;
	fwrite(data, 1, size, f);
	fclose(f);
	/* a shape that agrees with the header's small fields, when they are small */
	if (size >= 24 && u32_at(data + 8) && u32_at(data + 8) <= 64 && u32_at(data + 12) && u32_at(data + 12) <= 64 &&
	    u32_at(data + 16) && u32_at(data + 16) <= 256) {
		shape.n_layers = u32_at(data + 8);
		shape.n_heads = shape.n_kv_heads = u32_at(data + 12);
		shape.head_dim = u32_at(data + 16);
	}
	if (size >= 24 && u32_at(data + 20) <= KVP_ROPE_INTERLEAVED)
		shape.rope_layout = (kvp_rope_layout)u32_at(data + 20);
	if (size >= 28)
		memcpy(&shape.rope_theta, data + 24, 4);
	if (kvp_tria_stats_read(path, &shape, &st) == KVP_OK)
		kvp_tria_stats_free(&st);
	return 0;
}
