/*
 * tools/synthetic.c — the built-in synthetic attention trace (see synthetic.h for what it models).
 *
 * Numbers, per KV head of a layer (bands f = 0..63, band f rotating pos * 500000^(-2f/128) radians):
 *   key  k_f = m_f + n_f (+ 8 s_f for the 4 sink tokens, + 4 s_f for heavy hitters), then 4 outlier
 *        channels get an offset of 6..10 with a random sign, then RoPE. m_f is a unit phasor of random
 *        phase, n_f is N(0, 1) per component, and s_f a unit phasor that is non-zero only in the 8
 *        slowest bands (they turn less than 0.2 rad over 16K positions, so sinks stay sinks).
 *   value N(0, 1) per channel around a per-head mean of N(0, 0.3); sink tokens' values are scaled by 0.1.
 * Per query head (4 share a KV head):
 *   q_f = A (R_f e^(i phi_f) + (1 - R_f) n_f), then RoPE, where the concentration R_f is 0.8..0.95 in
 *   the 16 fastest bands, 0.3..0.9 in the middle ones and 0.6..0.9 in the 8 slowest; phi_f is the key
 *   mean's phase (so scores peak at distance 0 and fade with it), or s_f's phase in the slowest bands
 *   (so sinks and heavy hitters stand out). A is 1.6..2.8 in layer 0 and 0.75 times that in layer 1.
 *   At 8K tokens the 16 heads range from sink heads (up to 57% of the attention on the 4 sinks) to
 *   local ones (up to 24% on the last 128 tokens) and diffuse ones (normalized entropy up to 0.86).
 * Random numbers: xorshift64* and Box-Muller; the parameters and the token stream come from the seed.
 */
#include "tools/synthetic.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SYN_LAYERS 2
#define SYN_HEADS 8
#define SYN_KV_HEADS 2
#define SYN_HEAD_DIM 128
#define SYN_BANDS (SYN_HEAD_DIM / 2)
#define SYN_THETA 500000.0f
#define SYN_SINKS 4
#define SYN_SLOW_BANDS 8
#define SYN_FAST_BANDS 16
#define SYN_SINK_GAIN 8.0f
#define SYN_HITTER_GAIN 4.0f
#define SYN_HITTER_RATE 0.03
#define SYN_SINK_VALUE_SCALE 0.1f
#define SYN_PI 3.14159265358979323846

static uint64_t next_u64(uint64_t *state)
{
	*state ^= *state >> 12;
	*state ^= *state << 25;
	*state ^= *state >> 27;
	return *state * 0x2545F4914F6CDD1DULL;
}

/* uniform in [0, 1): the top 53 bits */
static double uniform(uint64_t *state)
{
	return (double)(next_u64(state) >> 11) * (1.0 / 9007199254740992.0);
}

static double uniform_in(uint64_t *state, double lo, double hi)
{
	return lo + (hi - lo) * uniform(state);
}

static float gaussian(uint64_t *state)
{
	double u = uniform(state), w = uniform(state);

	return (float)(sqrt(-2.0 * log(1.0 - u)) * cos(2.0 * SYN_PI * w));
}

static uint64_t seed_state(uint64_t seed, uint64_t stream)
{
	uint64_t s = seed * 0x9E3779B97F4A7C15ULL + stream * 0xD1B54A32D192ED03ULL;
	int i;

	if (!s)
		s = 0x9E3779B97F4A7C15ULL;
	for (i = 0; i < 8; i++) /* let nearby seeds drift apart */
		next_u64(&s);
	return s;
}

static int slow_band(int f)
{
	return f >= SYN_BANDS - SYN_SLOW_BANDS;
}

static void make_kv_head(struct synthetic_kv_head *h, uint64_t *rng)
{
	int f, i;

	for (f = 0; f < SYN_BANDS; f++) {
		double a = uniform_in(rng, 0, 2 * SYN_PI), b = uniform_in(rng, 0, 2 * SYN_PI);

		h->mean_re[f] = (float)cos(a);
		h->mean_im[f] = (float)sin(a);
		h->sink_re[f] = slow_band(f) ? (float)cos(b) : 0.0f;
		h->sink_im[f] = slow_band(f) ? (float)sin(b) : 0.0f;
	}
	for (i = 0; i < 4; i++) {
		/* channels of the bands just faster than the slowest: a pair member at random */
		int band = SYN_BANDS - SYN_SLOW_BANDS - 1 - 2 * i;

		h->outlier[i] = (uint32_t)(band + (next_u64(rng) & 1 ? SYN_BANDS : 0));
		h->outlier_offset[i] = (float)(uniform_in(rng, 6, 10) * (next_u64(rng) & 1 ? 1 : -1));
	}
}

static void make_query_head(struct synthetic_query_head *q, const struct synthetic_kv_head *kv, int layer,
			    uint64_t *rng)
{
	double amplitude = uniform_in(rng, 1.6, 2.8) * (layer ? 0.75 : 1.0);
	int f;

	for (f = 0; f < SYN_BANDS; f++) {
		double r = f < SYN_FAST_BANDS ? uniform_in(rng, 0.8, 0.95)
			   : slow_band(f)      ? uniform_in(rng, 0.6, 0.9)
					       : uniform_in(rng, 0.3, 0.9);
		float re = slow_band(f) ? kv->sink_re[f] : kv->mean_re[f];
		float im = slow_band(f) ? kv->sink_im[f] : kv->mean_im[f];

		q->mean_re[f] = (float)(amplitude * r) * re;
		q->mean_im[f] = (float)(amplitude * r) * im;
		q->spread[f] = (float)(amplitude * (1 - r));
	}
}

/* Carves every per-head array out of one allocation. */
static int allocate(struct synthetic_trace *s)
{
	size_t nq = SYN_LAYERS * SYN_HEADS, nkv = SYN_LAYERS * SYN_KV_HEADS, i;
	float *p;

	s->queries = calloc(nq, sizeof(*s->queries));
	s->keys = calloc(nkv, sizeof(*s->keys));
	s->arena = calloc(SYN_BANDS * (3 * nq + 4 * nkv + 3), sizeof(float));
	if (!s->queries || !s->keys || !s->arena)
		return -1;
	p = s->arena;
	for (i = 0; i < nq; i++, p += 3 * SYN_BANDS) {
		s->queries[i].mean_re = p;
		s->queries[i].mean_im = p + SYN_BANDS;
		s->queries[i].spread = p + 2 * SYN_BANDS;
	}
	for (i = 0; i < nkv; i++, p += 4 * SYN_BANDS) {
		s->keys[i].mean_re = p;
		s->keys[i].mean_im = p + SYN_BANDS;
		s->keys[i].sink_re = p + 2 * SYN_BANDS;
		s->keys[i].sink_im = p + 3 * SYN_BANDS;
	}
	s->frequency = p;
	s->cos = p + SYN_BANDS;
	s->sin = p + 2 * SYN_BANDS;
	return 0;
}

int synthetic_open(struct synthetic_trace *s, uint64_t n_steps, uint64_t seed)
{
	uint64_t rng = seed_state(seed, 1);
	int l, h, f;

	memset(s, 0, sizeof(*s));
	s->shape = (kvp_shape){ .n_layers = SYN_LAYERS, .n_heads = SYN_HEADS, .n_kv_heads = SYN_KV_HEADS,
				.head_dim = SYN_HEAD_DIM, .rope_theta = SYN_THETA, .rope_layout = KVP_ROPE_HALF };
	s->n_steps = n_steps;
	s->seed = seed;
	if (allocate(s)) {
		synthetic_close(s);
		return -1;
	}
	for (f = 0; f < SYN_BANDS; f++)
		s->frequency[f] = (float)pow(SYN_THETA, -2.0 * f / SYN_HEAD_DIM);
	for (l = 0; l < SYN_LAYERS; l++)
		for (h = 0; h < SYN_KV_HEADS; h++)
			make_kv_head(&s->keys[l * SYN_KV_HEADS + h], &rng);
	for (l = 0; l < SYN_LAYERS; l++)
		for (h = 0; h < SYN_HEADS; h++)
			make_query_head(&s->queries[l * SYN_HEADS + h],
					&s->keys[l * SYN_KV_HEADS + h / (SYN_HEADS / SYN_KV_HEADS)], l, &rng);
	synthetic_rewind(s);
	return 0;
}

/* Rotates band f of x, the pair (f, f + d/2), by the current position's angle. */
static void rope_half(const struct synthetic_trace *s, float *x)
{
	int f;

	for (f = 0; f < SYN_BANDS; f++) {
		float a = x[f], b = x[f + SYN_BANDS];

		x[f] = a * s->cos[f] - b * s->sin[f];
		x[f + SYN_BANDS] = a * s->sin[f] + b * s->cos[f];
	}
}

static void make_key(struct synthetic_trace *s, const struct synthetic_kv_head *h, float gain, float *k)
{
	int f, i;

	for (f = 0; f < SYN_BANDS; f++) {
		k[f] = h->mean_re[f] + gaussian(&s->rng) + gain * h->sink_re[f];
		k[f + SYN_BANDS] = h->mean_im[f] + gaussian(&s->rng) + gain * h->sink_im[f];
	}
	for (i = 0; i < 4; i++)
		k[h->outlier[i]] += h->outlier_offset[i];
	rope_half(s, k);
}

static void make_value(struct synthetic_trace *s, const struct synthetic_kv_head *h, int sink, float *v)
{
	int j;

	for (j = 0; j < SYN_HEAD_DIM; j++) {
		/* the head's mean: a fixed function of the head, cheap to recompute */
		float mean = 0.3f * h->mean_re[j % SYN_BANDS] * (j < SYN_BANDS ? 1.0f : -1.0f);

		v[j] = mean + gaussian(&s->rng);
		if (sink)
			v[j] *= SYN_SINK_VALUE_SCALE;
	}
}

static void make_query(struct synthetic_trace *s, const struct synthetic_query_head *h, float *q)
{
	int f;

	for (f = 0; f < SYN_BANDS; f++) {
		q[f] = h->mean_re[f] + h->spread[f] * gaussian(&s->rng);
		q[f + SYN_BANDS] = h->mean_im[f] + h->spread[f] * gaussian(&s->rng);
	}
	rope_half(s, q);
}

int synthetic_read_step(struct synthetic_trace *s, int32_t *pos, float *q, float *k, float *v)
{
	int sink, l, h;
	float gain;

	if (s->step >= s->n_steps)
		return 0;
	*pos = (int32_t)s->step;
	sink = s->step < SYN_SINKS;
	gain = sink ? SYN_SINK_GAIN : uniform(&s->rng) < SYN_HITTER_RATE ? SYN_HITTER_GAIN : 0.0f;
	for (l = 0; l < SYN_BANDS; l++) {
		s->cos[l] = (float)cos((double)s->step * s->frequency[l]);
		s->sin[l] = (float)sin((double)s->step * s->frequency[l]);
	}
	for (l = 0; l < SYN_LAYERS; l++) {
		for (h = 0; h < SYN_KV_HEADS; h++) {
			size_t at = ((size_t)l * SYN_KV_HEADS + (size_t)h) * SYN_HEAD_DIM;

			make_key(s, &s->keys[l * SYN_KV_HEADS + h], gain, k + at);
			make_value(s, &s->keys[l * SYN_KV_HEADS + h], sink, v + at);
		}
		for (h = 0; h < SYN_HEADS; h++)
			make_query(s, &s->queries[l * SYN_HEADS + h],
				   q + ((size_t)l * SYN_HEADS + (size_t)h) * SYN_HEAD_DIM);
	}
	s->step++;
	return 1;
}

void synthetic_rewind(struct synthetic_trace *s)
{
	s->step = 0;
	s->rng = seed_state(s->seed, 2);
}

void synthetic_close(struct synthetic_trace *s)
{
	free(s->queries);
	free(s->keys);
	free(s->arena);
	memset(s, 0, sizeof(*s));
}
