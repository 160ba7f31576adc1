/*
 * tools/synthetic.h — a synthetic attention trace with the structure of real heads, so cache
 * configurations can be compared on a fresh machine without a model or a recorded trace.
 *
 * Shape: 2 layers, 8 query heads, 2 KV heads (GQA 4:1), head_dim 128, RoPE theta 500000, half layout
 * (pairs (f, f + 64)), as in Llama 3. Each step yields a query, key and value per layer, post-RoPE.
 * What makes the heads realistic (synthetic.c gives the numbers):
 *   - per-band structure: every RoPE band f of a KV head has a mean key phasor; each query head has a
 *     per-band mean phasor with its own concentration (mean resultant length from 0.3 to 0.95), aligned
 *     with the keys in the high-frequency bands, so scores peak at short distance (local attention)
 *     and ripple with the band frequencies, as the TriAttention analysis describes;
 *   - outlier key channels: 4 channels per KV head in slowly rotating bands carry a large offset, the
 *     per-channel outliers that make per-token key quantization hard (KIVI's observation);
 *   - attention sinks: the first 4 tokens have keys aligned with the queries in the slowest bands and
 *     small values, so they draw a large share of every query's attention at any distance;
 *   - heavy hitters: 3% of tokens get a weaker alignment of the same kind, content-like salience.
 * The stream is a function of the seed only: every replay of it is the same.
 */
#ifndef KVP_TOOLS_SYNTHETIC_H
#define KVP_TOOLS_SYNTHETIC_H

#include <stdint.h>

#include "kvpager.h"

struct synthetic_query_head {
	float *mean_re, *mean_im; /* [head_dim/2]: the band's mean phasor (concentration included) */
	float *spread;            /* [head_dim/2]: noise per component of the band */
};

struct synthetic_kv_head {
	float *mean_re, *mean_im; /* [head_dim/2] */
	float *sink_re, *sink_im; /* [head_dim/2]: the direction sinks and heavy hitters add */
	uint32_t outlier[4];      /* channels */
	float outlier_offset[4];
};

struct synthetic_trace {
	kvp_shape shape;
	uint64_t n_steps, step, seed, rng;
	struct synthetic_query_head *queries; /* [n_layers][n_heads] */
	struct synthetic_kv_head *keys;       /* [n_layers][n_kv_heads] */
	float *frequency;                     /* [head_dim/2]: radians per position */
	float *cos, *sin;                     /* [head_dim/2]: of the current position */
	float *arena;                         /* every float array above */
};

/* Returns 0, or -1 when memory runs out. */
int synthetic_open(struct synthetic_trace *s, uint64_t n_steps, uint64_t seed);
/* Same contract as trace_read_step: q [n_layers][n_heads][head_dim], k, v [n_layers][n_kv_heads][head_dim]. */
int synthetic_read_step(struct synthetic_trace *s, int32_t *pos, float *q, float *k, float *v);
void synthetic_rewind(struct synthetic_trace *s);
void synthetic_close(struct synthetic_trace *s);

#endif /* KVP_TOOLS_SYNTHETIC_H */
