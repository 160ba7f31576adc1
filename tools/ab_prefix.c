/*
 * kvpager-ab --prefix-share: K prompts that share their first P tokens, each opened with the plugin's
 * seq_open_prefix on one tenant (model= the checkpoint's name), the forward pass over what the cache did
 * not hold, then greedy steps; every prompt also runs through a sequence of the same spec opened without
 * the prefix cache, and its generated tokens must equal that run's. The report: per prompt n_cached and
 * the check, then the hit rate (tokens found over prompt tokens) and the prefill tokens saved.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/ab.h"

/* The checkpoint's file name as a model= value: characters model= refuses become '_', at most 63. */
static void model_name(const char *path, char out[64])
{
	const char *base = strrchr(path, '/');
	size_t n = 0;

	for (base = base ? base + 1 : path; *base && n < 63; base++)
		out[n++] = (*base > ' ' && *base < 127 && !strchr(",()=", *base)) ? *base : '_';
	out[n] = '\0';
	if (!n)
		snprintf(out, 64, "model");
}

int ab_prefix_prompts(const int *source, int n_source, int length, int count, int vocab, int *prompts)
{
	int shared = length * 3 / 4, rest = length - shared, k, i;

	if (length < 2 || count < 1 || n_source < length)
		return -1;
	for (k = 0; k < count; k++) {
		int *p = prompts + (size_t)k * (size_t)length;
		int from = shared + k * rest; /* the text that follows, prompt after prompt */

		memcpy(p, source, sizeof(int) * (size_t)shared);
		if (n_source >= shared + count * rest) {
			memcpy(p + shared, source + from, sizeof(int) * (size_t)rest);
		} else { /* too little text: the same tail, its first token made different for each prompt */
			memcpy(p + shared, source + shared, sizeof(int) * (size_t)rest);
			p[shared] = LLAMA_TOKEN_BYTE0 + (source[shared] - LLAMA_TOKEN_BYTE0 + k) % (vocab - LLAMA_TOKEN_BYTE0);
		}
		for (i = shared; i < length && k; i++) /* no prompt is the first one again */
			if (p[i] != prompts[i])
				break;
		if (k && i == length)
			return -1;
	}
	return shared;
}

/* The forward pass over prompt[from..length), then steps greedy tokens into generated. */
static int prompt_run(const struct llama_model *m, struct llama_state *state, struct llama_plugin_cache *c,
		      const int *prompt, int length, int from, int steps, int *generated)
{
	struct llama_attention att = llama_plugin_attention(c);
	int pos, token = prompt[from], rc = LLAMA_OK;

	for (pos = from; pos < length + steps - 1 && rc == LLAMA_OK; pos++) {
		if (pos < length)
			token = prompt[pos];
		rc = llama_forward(m, state, &att, NULL, token, pos);
		if (pos >= length - 1 && rc == LLAMA_OK)
			token = generated[pos - (length - 1)] = llama_argmax(state->logits, m->config.vocab_size);
	}
	return rc;
}

/* Without the prefix cache: a sequence of its own (plain seq_open) per prompt. */
static int reference_run(const kvp_plugin_v1 *api, const struct llama_model *m, struct llama_state *state,
			 const struct ab_prefix_run *r, const int *prompt, int *generated, char message[AB_MESSAGE_MAX])
{
	struct llama_plugin_cache c;
	int rc = llama_plugin_cache_open(&c, api, &m->config, r->pool, r->spec);

	if (rc) {
		snprintf(message, AB_MESSAGE_MAX, "spec '%.100s': %.300s", r->spec, c.message);
		return rc == LLAMA_EINPUT ? 2 : 1;
	}
	rc = prompt_run(m, state, &c, prompt, r->length, 0, r->steps, generated);
	if (rc)
		snprintf(message, AB_MESSAGE_MAX, "the run without the prefix cache failed: %.400s", c.message);
	llama_plugin_cache_close(&c);
	return rc ? 1 : 0;
}

static int api_failed(const kvp_plugin_v1 *api, kvp_status st, const char *what, char message[AB_MESSAGE_MAX])
{
	snprintf(message, AB_MESSAGE_MAX, "%.100s: %.60s: %.300s", what, api->strerror(st), api->last_error());
	return st == KVP_EINVAL || st == KVP_EUNSUPPORTED ? 2 : 1;
}

/* The prefix-cached runs on one tenant of one pool, prompt after prompt. */
static int cached_runs(const kvp_plugin_v1 *api, const struct llama_model *m, struct llama_state *state,
		       struct ab_prefix_run *r, const int *prompts, const int *expected, char message[AB_MESSAGE_MAX])
{
	kvp_shape shape = llama_model_shape(&m->config);
	int *generated = malloc(sizeof(int) * (size_t)r->steps);
	struct llama_plugin_cache c;
	char spec[AB_MESSAGE_MAX];
	kvp_status st;
	int k, rc = 0;

	memset(&c, 0, sizeof(c));
	c.api = api;
	c.n_kv_heads = m->config.n_kv_heads;
	c.head_size = m->config.head_size;
	snprintf(spec, sizeof(spec), "%s%smodel=%s", r->spec, r->spec[0] ? "," : "", r->model_name);
	if (ab_spec_has(r->spec, "model"))
		snprintf(spec, sizeof(spec), "%s", r->spec);
	if (!generated) {
		snprintf(message, AB_MESSAGE_MAX, "no memory for %d greedy tokens", r->steps);
		return 1;
	}
	if ((st = api->pool_open(r->pool, &c.pool)) || (st = api->tenant_open(c.pool, "ab", spec, &c.tenant)))
		rc = api_failed(api, st, c.pool ? spec : r->pool, message);
	for (k = 0; k < r->count && !rc; k++) {
		const int *prompt = prompts + (size_t)k * (size_t)r->length;
		int32_t *ids = r->ids;
		uint32_t cached;
		for (int i = 0; i < r->length; i++)
			ids[i] = prompt[i];
		if ((st = api->seq_open_prefix(c.tenant, &shape, (uint32_t)r->length, ids, &c.seq, &cached))) {
			rc = api_failed(api, st, "seq_open_prefix", message);
			break;
		}
		r->n_cached[k] = cached;
		if (prompt_run(m, state, &c, prompt, r->length, (int)cached, r->steps, generated)) {
			snprintf(message, AB_MESSAGE_MAX, "prompt %d: %.400s", k + 1, c.message);
			rc = 1;
		}
		r->equal[k] = !memcmp(generated, expected + (size_t)k * (size_t)r->steps, sizeof(int) * (size_t)r->steps);
		api->seq_close(c.seq);
		c.seq = NULL;
	}
	r->stats.size = sizeof(r->stats);
	if (!rc && (st = api->tenant_stats(c.tenant, &r->stats)))
		rc = api_failed(api, st, "tenant_stats", message);
	llama_plugin_cache_close(&c);
	free(generated);
	return rc;
}

int ab_prefix_share(const kvp_plugin_v1 *api, const struct llama_model *m, struct ab_prefix_run *r,
		    const int *prompts, char message[AB_MESSAGE_MAX])
{
	struct llama_state state;
	int *expected = malloc(sizeof(int) * (size_t)r->count * (size_t)r->steps);
	int k, rc = 0;

	if (api->abi_minor < 3 || api->size < offsetof(kvp_plugin_v1, seq_open_prefix) + sizeof(api->seq_open_prefix)) {
		free(expected);
		snprintf(message, AB_MESSAGE_MAX, "the plugin's table is ABI 1.%u: seq_open_prefix needs 1.3", api->abi_minor);
		return 2;
	}
	model_name(r->model_path, r->model_name);
	r->ids = malloc(sizeof(int32_t) * (size_t)r->length);
	r->n_cached = calloc((size_t)r->count, sizeof(uint32_t));
	r->equal = calloc((size_t)r->count, sizeof(int));
	if (!expected || !r->ids || !r->n_cached || !r->equal || llama_state_init(&state, &m->config)) {
		free(expected);
		snprintf(message, AB_MESSAGE_MAX, "no memory for %d prompts", r->count);
		return 1;
	}
	for (k = 0; k < r->count && !rc; k++)
		rc = reference_run(api, m, &state, r, prompts + (size_t)k * (size_t)r->length,
				   expected + (size_t)k * (size_t)r->steps, message);
	if (!rc)
		rc = cached_runs(api, m, &state, r, prompts, expected, message);
	llama_state_free(&state);
	free(expected);
	return rc;
}

void ab_prefix_print(FILE *f, const struct ab_prefix_run *r)
{
	uint64_t hit = 0, total = (uint64_t)r->count * (uint64_t)r->length;
	int k, equal = 0;

	fprintf(f, "kvpager-ab --prefix-share: %s, %d prompts of %d tokens sharing their first %d, %d greedy "
		"tokens each; tenant model=%s, spec \"%s\"\n", r->model_path, r->count, r->length, r->shared, r->steps,
		r->model_name, r->spec);
	fprintf(f, "prompt  n_cached  computed  generated = without the cache\n");
	for (k = 0; k < r->count; k++) {
		hit += r->n_cached[k];
		equal += r->equal[k];
		fprintf(f, "%6d  %8u  %8u  %s\n", k + 1, r->n_cached[k], (unsigned)r->length - r->n_cached[k],
			r->equal[k] ? "yes" : "NO");
	}
	fprintf(f, "hit rate: %llu/%llu prompt tokens (%.1f%%)\n", (unsigned long long)hit, (unsigned long long)total,
		total ? 100.0 * (double)hit / (double)total : 0.0);
	fprintf(f, "prefill tokens saved: %llu of %llu\n", (unsigned long long)hit, (unsigned long long)total);
	fprintf(f, "tenant stats: prefix_hit_tokens %llu, prefix_miss_tokens %llu, bytes_cached %llu\n",
		(unsigned long long)r->stats.prefix_hit_tokens, (unsigned long long)r->stats.prefix_miss_tokens,
		(unsigned long long)r->stats.bytes_cached);
	fprintf(f, "generated tokens equal the run without the cache: %d of %d prompts\n", equal, r->count);
}

void ab_prefix_free(struct ab_prefix_run *r)
{
	free(r->ids);
	free(r->n_cached);
	free(r->equal);
	r->ids = NULL;
	r->n_cached = NULL;
	r->equal = NULL;
}

int ab_prefix_all_equal(const struct ab_prefix_run *r)
{
	for (int k = 0; k < r->count; k++)
		if (!r->equal[k])
			return 0;
	return 1;
}
