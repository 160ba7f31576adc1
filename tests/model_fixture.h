/*
 * The real models of ../shared/models in tests: paths, teacher-forced runs that record every layer's
 * attention output and every step's argmax, and the error between two such runs.
 */
#ifndef KVP_TEST_MODEL_FIXTURE_H
#define KVP_TEST_MODEL_FIXTURE_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool_fixture.h"
#include "tools/llama.h"

struct attention_tap {
	float *out; /* [steps][n_layers][dim] */
	int dim, n_layers;
};

static inline void record_attention(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct attention_tap *a = ctx;

	if (tap == LLAMA_TAP_ATTENTION)
		memcpy(a->out + ((size_t)pos * a->n_layers + layer) * a->dim, x, (size_t)n * sizeof *x);
}

/* Teacher-forces tokens through the model with the given attention; records attention outputs and argmaxes. */
static inline void run_model(const struct llama_model *m, struct llama_attention att, const int *tokens, int n,
		      struct attention_tap *tap, int *argmax)
{
	struct llama_observer obs = { tap, record_attention };
	struct llama_state s;

	cr_assert_eq(llama_state_init(&s, &m->config), LLAMA_OK);
	for (int pos = 0; pos < n; pos++) {
		cr_assert_eq(llama_forward(m, &s, &att, &obs, tokens[pos], pos), LLAMA_OK, "position %d", pos);
		argmax[pos] = llama_argmax(s.logits, m->config.vocab_size);
	}
	llama_state_free(&s);
}

/* Greedy tokens from BOS with the exact cache: the stream every compared run is forced through. */
static inline void greedy_tokens(const struct llama_model *m, int *tokens, int n)
{
	struct llama_dense_cache dense;
	struct llama_state s;
	struct llama_attention att;

	cr_assert_eq(llama_dense_cache_init(&dense, &m->config), LLAMA_OK);
	cr_assert_eq(llama_state_init(&s, &m->config), LLAMA_OK);
	att = llama_dense_attention(&dense);
	tokens[0] = LLAMA_TOKEN_BOS;
	for (int pos = 0; pos + 1 < n; pos++) {
		cr_assert_eq(llama_forward(m, &s, &att, NULL, tokens[pos], pos), LLAMA_OK);
		tokens[pos + 1] = llama_argmax(s.logits, m->config.vocab_size);
	}
	llama_state_free(&s);
	llama_dense_cache_free(&dense);
}

/* Mean and worst relative L2 error of b's attention outputs against a's, over positions [from, n). */
static inline void attention_errors(const struct llama_model *m, const struct attention_tap *a,
				    const struct attention_tap *b, int from, int n, double *mean, double *worst)
{
	double sum = 0;

	*worst = 0;
	for (int pos = from; pos < n; pos++)
		for (int l = 0; l < m->config.n_layers; l++) {
			const float *x = a->out + ((size_t)pos * m->config.n_layers + l) * m->config.dim;
			const float *y = b->out + ((size_t)pos * m->config.n_layers + l) * m->config.dim;
			double num = 0, den = 0;
			for (int j = 0; j < m->config.dim; j++) {
				num += (double)(x[j] - y[j]) * (x[j] - y[j]);
				den += (double)x[j] * x[j];
			}
			*worst = fmax(*worst, sqrt(num / den));
			sum += sqrt(num / den);
		}
	*mean = sum / ((double)(n - from) * m->config.n_layers);
}

static inline void tap_open(struct attention_tap *t, const struct llama_model *m, int steps)
{
	t->dim = m->config.dim;
	t->n_layers = m->config.n_layers;
	t->out = calloc((size_t)steps * m->config.n_layers * m->config.dim, sizeof(float));
	cr_assert_not_null(t->out);
}

static inline void run_exact(const struct llama_model *m, const int *tokens, int n, struct attention_tap *tap,
			     int *argmax)
{
	struct llama_dense_cache dense;

	cr_assert_eq(llama_dense_cache_init(&dense, &m->config), LLAMA_OK);
	run_model(m, llama_dense_attention(&dense), tokens, n, tap, argmax);
	llama_dense_cache_free(&dense);
}

/* Teacher-forces tokens through the plugin with a tenant spec; stats (if set) receives the sequence's. */
static inline void run_spec(const struct llama_model *m, const char *spec, const int *tokens, int n,
			    struct attention_tap *tap, int *argmax, kvp_stats *stats)
{
	struct llama_plugin_cache plugin;

	cr_assert_eq(llama_plugin_cache_open(&plugin, kvp_plugin(KVP_ABI_MAJOR), &m->config, "mem=256MiB", spec),
		     LLAMA_OK, "%s: %s", spec, plugin.message);
	run_model(m, llama_plugin_attention(&plugin), tokens, n, tap, argmax);
	if (stats)
		cr_assert_eq(kvp_seq_stats(plugin.seq, stats), KVP_OK);
	llama_plugin_cache_close(&plugin);
}

#endif /* KVP_TEST_MODEL_FIXTURE_H */
