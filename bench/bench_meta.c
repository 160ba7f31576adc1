/*
 * The pager's bookkeeping (kvp_stats.bytes_meta) at block=64, next to the K and V bytes it keeps: a plain
 * fp16 cache, and StreamingLLM, H2O and TriAttention (online statistics) each on a TurboQuant 3-bit cold
 * tier, decoding token by token through the public calls (append, attend, step) on random post-RoPE keys:
 *   4 layers, 4 KV heads, 16 query heads (GQA 4), 2048 positions, head_dim 64 (kjv-64's) and 128.
 * A stream is one layer's K or V of one KV head (2 x 4 x 4 = 32 of them). Per token per stream:
 *   metadata   what bytes_meta grew by from the first position to the last, over the tokens appended
 *              since (what kvpager-ab's meta/tok column shows); the target is at most 1 byte;
 *   KV bytes   bytes_exact + bytes_compressed at the end over the tokens appended (the baseline).
 * The sequence's own metadata after its first position (its structs, scratch, the codecs' and the
 * policy's fixed state) is printed too, as a total; it does not grow with the tokens.
 * bytes_meta also counts jemalloc's size-class slack of every allocation: at head_dim 128 a 3-bit
 * TurboQuant block of 64 tokens is 6656 bytes in a 7168-byte class, 4 bytes per cold token per stream.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kvpager.h"

enum { D_MAX = 128, LAYERS = 4, NKV = 4, NH = 16, POSITIONS = 2048 };

#define TQ3 "k=turboquant(bits=3),v=turboquant(bits=3)"

static const struct config {
	const char *name, *spec;
} configs[] = {
	{ "plain fp16", "block=64,store=fp16" },
	{ "streaming + tq3", "block=64,window=64,store=fp16,policy=streaming(sinks=4,window=508)," TQ3 },
	{ "h2o 1/8 + tq3", "block=64,window=64,store=fp16,policy=h2o(heavy=0.0625,recent=0.0625,every=16)," TQ3 },
	{ "triattention 512 + tq3", "block=64,window=64,store=fp16,policy=triattention(budget=512)," TQ3 },
};

static void die(const char *what)
{
	fprintf(stderr, "bench_meta: %s: %s\n", what, kvp_last_error());
	exit(1);
}

/* A deterministic pseudo-random fill in [-1, 1). */
static void fill(float *x, size_t n, uint64_t *state)
{
	for (size_t i = 0; i < n; i++) {
		*state = *state * 6364136223846793005ull + 1442695040888963407ull;
		x[i] = (float)((*state >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
	}
}

struct measured {
	kvp_stats first, last;
};

static void run(const struct config *c, uint32_t d, struct measured *m)
{
	kvp_shape shape = { LAYERS, NH, NKV, d, 10000.0f, KVP_ROPE_HALF };
	static float k[NKV * D_MAX], v[NKV * D_MAX], q[NH * D_MAX], out[NH * D_MAX];
	uint64_t state = 42;
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *s;

	if (kvp_pool_open("", &pool) != KVP_OK)
		die("pool");
	if (kvp_tenant_open(pool, "bench", c->spec, &t) != KVP_OK)
		die(c->spec);
	if (kvp_seq_open(t, &shape, &s) != KVP_OK)
		die("kvp_seq_open");
	for (int32_t pos = 0; pos < POSITIONS; pos++) {
		for (uint32_t l = 0; l < LAYERS; l++) {
			fill(k, (size_t)NKV * d, &state);
			fill(v, (size_t)NKV * d, &state);
			fill(q, (size_t)NH * d, &state);
			if (kvp_append(s, l, 1, &pos, k, v) != KVP_OK || kvp_attend(s, l, q, out) != KVP_OK)
				die("append and attend");
		}
		if (pos == 0) {
			m->first.size = sizeof m->first;
			kvp_seq_stats(s, &m->first);
		}
		if (kvp_seq_step(s) != KVP_OK)
			die("kvp_seq_step");
	}
	m->last.size = sizeof m->last;
	kvp_seq_stats(s, &m->last);
	kvp_seq_close(s);
	kvp_tenant_close(t);
	kvp_pool_close(pool);
}

static void measure(const struct config *c, uint32_t d)
{
	char name[64], dense[48];
	struct measured m;
	double streams_tokens, grown, kv;

	run(c, d, &m);
	snprintf(name, sizeof name, "d=%u %s", d, c->name);
	snprintf(dense, sizeof dense, "of dense fp16 (%u B)", 2 * d);
	/* tokens_appended is summed over the (layer, KV head) streams; each holds a K and a V stream */
	streams_tokens = 2.0 * (double)(m.last.tokens_appended - m.first.tokens_appended);
	grown = ((double)m.last.bytes_meta - (double)m.first.bytes_meta) / streams_tokens;
	kv = (double)(m.last.bytes_exact + m.last.bytes_compressed) / (2.0 * (double)m.last.tokens_appended);
	bench_row(name, "metadata/token/stream", grown, kv, 1, "B", "of KV bytes/token/stream");
	bench_row(name, "KV bytes/token/stream", kv, 2.0 * d, 1, "B", dense);
	bench_row(name, "sequence's own meta", (double)m.first.bytes_meta, (double)m.last.bytes_meta, 1.0 / 1024,
		  "KiB", "of bytes_meta at the end");
}

int main(void)
{
	bench_header("bytes_meta at block=64 per token per stream (one layer's K or V of one KV head), "
		     "4 layers x 4 KV heads, 2048 positions");
	for (uint32_t d = 64; d <= D_MAX; d *= 2)
		for (size_t i = 0; i < sizeof configs / sizeof *configs; i++)
			measure(&configs[i], d);
	return 0;
}
