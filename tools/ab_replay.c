/*
 * tools/ab_replay.c — replaying a stream of queries, keys and values (a trace or the synthetic
 * generator) through cache specs of the kvpager plugin, against exact attention computed here.
 *
 * The exact reference is computed once, in its own pass, from a dense copy of every key and value: the
 * cache under test never takes part in it. Each spec then gets a fresh pool, tenant and sequence and
 * sees the same steps: append the step's key and value to every layer, attend with its query at the
 * checked steps, kvp_seq_step. Only those library calls are timed, so tokens/s is the cache's own rate.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tools/ab.h"
#include "tools/llama.h"

/* The dense copy of the keys and values must fit in this much memory. */
#define AB_REFERENCE_MAX_BYTES (8ULL << 30)

static int ab_fail(char message[AB_MESSAGE_MAX], int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int ab_fail(char message[AB_MESSAGE_MAX], int status, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(message, AB_MESSAGE_MAX, fmt, ap);
	va_end(ap);
	return status;
}

int ab_checked_step(const struct ab_reference *ref, uint64_t step, uint64_t n_steps)
{
	return (step + 1) % ref->every == 0 || step + 1 == n_steps;
}

static uint64_t count_checked(uint32_t every, uint64_t n_steps)
{
	return n_steps / every + (n_steps % every ? 1 : 0);
}

/* One step's q, k, v for every layer. */
struct step_buffers {
	float *q, *k, *v, *out;
};

static int buffers_open(struct step_buffers *b, const kvp_shape *s)
{
	size_t nq = (size_t)s->n_layers * s->n_heads * s->head_dim;
	size_t nkv = (size_t)s->n_layers * s->n_kv_heads * s->head_dim;

	b->q = malloc(nq * sizeof(float));
	b->out = malloc(nq * sizeof(float));
	b->k = malloc(nkv * sizeof(float));
	b->v = malloc(nkv * sizeof(float));
	return b->q && b->out && b->k && b->v ? 0 : -1;
}

static void buffers_close(struct step_buffers *b)
{
	free(b->q);
	free(b->out);
	free(b->k);
	free(b->v);
}

/* The dense history and the scratch of exact attention. */
struct dense_history {
	const kvp_shape *shape;
	float *keys, *values; /* [n_steps][n_layers][n_kv_heads][d] */
	float *scores;        /* [n_steps] */
	size_t row;           /* floats of one step: n_layers * n_kv_heads * d */
};

/* softmax(q K^T / sqrt(d)) V of one query head over steps 0..n-1 of layer l, KV head g */
static void exact_head(struct dense_history *h, uint32_t l, uint32_t g, uint64_t n, const float *q, float *out)
{
	uint32_t d = h->shape->head_dim, j;
	size_t at = ((size_t)l * h->shape->n_kv_heads + g) * d;
	float scale = 1.0f / sqrtf((float)d), max = -INFINITY;
	double sum = 0;
	uint64_t t;

	for (t = 0; t < n; t++) {
		h->scores[t] = llama_dot(q, h->keys + t * h->row + at, (int)d) * scale;
		max = h->scores[t] > max ? h->scores[t] : max;
	}
	memset(out, 0, d * sizeof(float));
	for (t = 0; t < n; t++) {
		const float *v = h->values + t * h->row + at;
		float p = expf(h->scores[t] - max);

		sum += p;
		for (j = 0; j < d; j++)
			out[j] += p * v[j];
	}
	for (j = 0; j < d; j++)
		out[j] = (float)(out[j] / sum);
}

static void exact_step(struct dense_history *h, uint64_t n, const float *q, float *out)
{
	const kvp_shape *s = h->shape;
	uint32_t l, hd, group = s->n_heads / s->n_kv_heads;
	size_t width = (size_t)s->n_heads * s->head_dim;

	for (l = 0; l < s->n_layers; l++)
		for (hd = 0; hd < s->n_heads; hd++)
			exact_head(h, l, hd / group, n, q + l * width + (size_t)hd * s->head_dim,
				   out + l * width + (size_t)hd * s->head_dim);
}

static int history_open(struct dense_history *h, const kvp_shape *s, uint64_t n_steps,
			char message[AB_MESSAGE_MAX])
{
	memset(h, 0, sizeof(*h));
	h->shape = s;
	h->row = (size_t)s->n_layers * s->n_kv_heads * s->head_dim;
	if (n_steps > AB_REFERENCE_MAX_BYTES / 8 / h->row)
		return ab_fail(message, 1, "the exact reference needs a dense copy of %llu steps of %zu floats "
			       "of keys and values: more than %llu GiB", (unsigned long long)n_steps, 2 * h->row,
			       AB_REFERENCE_MAX_BYTES >> 30);
	h->keys = malloc(n_steps * h->row * sizeof(float));
	h->values = malloc(n_steps * h->row * sizeof(float));
	h->scores = malloc(n_steps * sizeof(float));
	if (!h->keys || !h->values || !h->scores)
		return ab_fail(message, 1, "no memory for the exact reference of %llu steps",
			       (unsigned long long)n_steps);
	return 0;
}

static void history_close(struct dense_history *h)
{
	free(h->keys);
	free(h->values);
	free(h->scores);
}

static int source_failed(const struct ab_source *src, char message[AB_MESSAGE_MAX])
{
	return ab_fail(message, 2, "%s", src->error(src->ctx));
}

static int reference_pass(const struct ab_source *src, struct ab_reference *ref, struct dense_history *h,
			  struct ab_progress *progress, char message[AB_MESSAGE_MAX])
{
	size_t width = (size_t)src->shape.n_layers * src->shape.n_heads * src->shape.head_dim;
	uint64_t step, checked = 0;
	float *q = malloc(width * sizeof(float));
	int32_t pos;
	int rc = 0, got;

	if (!q)
		return ab_fail(message, 1, "no memory for a query");
	for (step = 0; step < src->n_steps && !rc; step++) {
		got = src->read_step(src->ctx, &pos, q, h->keys + step * h->row, h->values + step * h->row);
		if (got <= 0)
			rc = got < 0 ? source_failed(src, message)
				     : ab_fail(message, 2, "the stream ended after %llu of %llu steps",
					       (unsigned long long)step, (unsigned long long)src->n_steps);
		else if (ab_checked_step(ref, step, src->n_steps))
			exact_step(h, step + 1, q, ref->outputs + checked++ * width);
		ab_progress_advance(progress, 1, "exact reference");
	}
	free(q);
	return rc;
}

int ab_replay_reference(const struct ab_source *src, uint32_t every, struct ab_reference *ref,
			struct ab_progress *progress, char message[AB_MESSAGE_MAX])
{
	size_t width = (size_t)src->shape.n_layers * src->shape.n_heads * src->shape.head_dim;
	struct dense_history h;
	int rc;

	memset(ref, 0, sizeof(*ref));
	ref->every = every ? every : 1;
	ref->n_checked = count_checked(ref->every, src->n_steps);
	rc = history_open(&h, &src->shape, src->n_steps, message);
	if (!rc && !(ref->outputs = malloc(ref->n_checked * width * sizeof(float))))
		rc = ab_fail(message, 1, "no memory for %llu reference outputs", (unsigned long long)ref->n_checked);
	if (!rc && src->rewind(src->ctx))
		rc = source_failed(src, message);
	if (!rc)
		rc = reference_pass(src, ref, &h, progress, message);
	history_close(&h);
	if (rc)
		ab_reference_free(ref);
	return rc;
}

void ab_reference_free(struct ab_reference *ref)
{
	free(ref->outputs);
	ref->outputs = NULL;
}

static uint64_t bytes_held(const kvp_stats *st)
{
	return st->bytes_exact + st->bytes_compressed + st->bytes_meta;
}

void ab_bytes_sample(struct ab_bytes_meter *m, const kvp_stats *st)
{
	uint64_t held = bytes_held(st);
	double retained;

	m->positions++;
	if (m->positions == 1) {
		m->meta_first = st->bytes_meta;
		m->appended_first = st->tokens_appended;
	}
	m->positions_sum += (double)m->positions;
	m->held_sum += (double)held;
	m->dense_sum += (double)st->bytes_dense_fp16;
	m->held_peak = held > m->held_peak ? held : m->held_peak;
	m->compressed_peak = st->bytes_compressed > m->compressed_peak ? st->bytes_compressed : m->compressed_peak;
	/* every position appends one token to every stream, so streams = tokens_appended / positions */
	retained = st->tokens_appended ? (double)st->tokens_retained * (double)m->positions / (double)st->tokens_appended
				       : 0.0;
	m->retained_peak = retained > m->retained_peak ? retained : m->retained_peak;
}

void ab_bytes_merge(struct ab_bytes_meter *into, const struct ab_bytes_meter *from)
{
	into->positions += from->positions;
	into->positions_sum += from->positions_sum;
	into->held_sum += from->held_sum;
	into->dense_sum += from->dense_sum;
	into->held_peak = from->held_peak > into->held_peak ? from->held_peak : into->held_peak;
	into->compressed_peak = from->compressed_peak > into->compressed_peak ? from->compressed_peak
									      : into->compressed_peak;
	into->retained_peak = from->retained_peak > into->retained_peak ? from->retained_peak : into->retained_peak;
	/* summed like the sequences' end stats, so that their difference is the sum of each one's growth */
	into->meta_first += from->meta_first;
	into->appended_first += from->appended_first;
}

static double share(double num, double den)
{
	return den > 0 ? num / den : 0.0;
}

void ab_result_bytes(struct ab_result *r, const kvp_stats *st, uint64_t tokens)
{
	const struct ab_bytes_meter *m = &r->meter;
	uint64_t held = bytes_held(st);

	r->stats = *st;
	r->tokens = tokens;
	r->bytes_peak = held > m->held_peak ? held : m->held_peak;
	r->bytes_per_token_final = share((double)held, (double)tokens);
	r->compression_final = share((double)st->bytes_dense_fp16, (double)held);
	/* tokens_appended is summed over the (layer, KV head) streams, each holding a K and a V */
	r->meta_sequence = m->positions ? (double)m->meta_first : NAN;
	r->meta_per_token_stream = m->positions && st->tokens_appended > m->appended_first ?
		((double)st->bytes_meta - (double)m->meta_first) / (2.0 * (double)(st->tokens_appended - m->appended_first)) :
		NAN;
	/* without samples there is no mean: n/a, rather than the final snapshot under the mean's name */
	r->bytes_per_token = m->positions ? share(m->held_sum, m->positions_sum) : NAN;
	r->bytes_per_token_peak = m->positions ? share((double)r->bytes_peak, (double)tokens) : NAN;
	r->compression = m->positions ? share(m->dense_sum, m->held_sum) : NAN;
	r->cold_tier = r->spec && (ab_spec_has(r->spec, "k") || ab_spec_has(r->spec, "v"));
	r->cold_tier_used = m->compressed_peak > 0 || st->bytes_compressed > 0;
}

/* ---- the tenant spec's top-level keys (the library has checked the spec before any run) ---- */

static int is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The value of key at depth 0 of spec ("" when absent), up to cap - 1 characters, into out. */
static const char *spec_value(const char *spec, const char *key, char *out, size_t cap)
{
	size_t klen = strlen(key), n;
	const char *s = spec, *end;
	int depth;

	out[0] = '\0';
	while (*s) {
		while (is_blank(*s))
			s++;
		for (end = s, depth = 0; *end && (*end != ',' || depth); end++)
			depth += *end == '(' ? 1 : *end == ')' ? -1 : 0;
		if (!strncmp(s, key, klen)) {
			const char *v = s + klen;

			while (is_blank(*v))
				v++;
			if (*v == '=') {
				for (v++; is_blank(*v); v++)
					;
				n = (size_t)(end - v) < cap - 1 ? (size_t)(end - v) : cap - 1;
				memcpy(out, v, n);
				while (n && is_blank(out[n - 1]))
					n--;
				out[n] = '\0';
				return out;
			}
		}
		s = *end ? end + 1 : end;
	}
	return out;
}

int ab_spec_has(const char *spec, const char *key)
{
	char value[8];

	return spec_value(spec, key, value, sizeof(value))[0] != '\0';
}

uint32_t ab_spec_u32(const char *spec, const char *key, uint32_t fallback)
{
	char value[32], *end;
	unsigned long v = strtoul(spec_value(spec, key, value, sizeof(value)), &end, 10);

	return value[0] && !*end && v <= UINT32_MAX ? (uint32_t)v : fallback;
}

/* The policy's name and arguments: "streaming(window=28)" gives "streaming" and "window=28". */
static void policy_parts(const char *policy, char *name, char *args, size_t cap)
{
	const char *open = strchr(policy, '('), *close = strrchr(policy, ')');
	size_t n = open ? (size_t)(open - policy) : strlen(policy);

	n = n < cap - 1 ? n : cap - 1;
	memcpy(name, policy, n);
	name[n] = '\0';
	n = open && close > open ? (size_t)(close - open - 1) : 0;
	n = n < cap - 1 ? n : cap - 1;
	memcpy(args, open ? open + 1 : "", n);
	args[n] = '\0';
}

/*
 * The most tokens a stream holds under the spec's policy, when the spec decides it: a round cuts the
 * stream to its budget once it holds budget + every. 0 when it does not (no policy, a ratio, gating).
 */
static uint64_t policy_most_held(const char *spec, char *name, size_t cap)
{
	char policy[256], args[256], gate[16];

	spec_value(spec, "policy", policy, sizeof(policy));
	spec_value(spec, "gate", gate, sizeof(gate));
	if (!policy[0] || (gate[0] && strcmp(gate, "off")))
		return 0;
	policy_parts(policy, name, args, cap < sizeof(args) ? cap : sizeof(args));
	if (!strcmp(name, "streaming"))
		return (uint64_t)ab_spec_u32(args, "sinks", 4) + ab_spec_u32(args, "window", 1024) +
		       ab_spec_u32(args, "every", 1);
	if (!strcmp(name, "triattention") && !ab_spec_has(args, "ratio"))
		return (uint64_t)ab_spec_u32(args, "budget", 2048) + ab_spec_u32(args, "every", 128);
	return 0;
}

int ab_cold_tier_unreachable(const char *spec, uint64_t positions, char why[AB_MESSAGE_MAX])
{
	uint32_t block = ab_spec_u32(spec, "block", AB_TENANT_BLOCK);
	uint32_t sinks = ab_spec_u32(spec, "sinks", AB_TENANT_SINKS);
	uint32_t window = ab_spec_u32(spec, "window", AB_TENANT_WINDOW);
	uint64_t needed = (uint64_t)sinks + window + block, most;
	char name[64];
	int n;

	if (!ab_spec_has(spec, "k") && !ab_spec_has(spec, "v"))
		return 0;
	if (positions < needed)
		n = snprintf(why, AB_MESSAGE_MAX, "the run has %llu positions", (unsigned long long)positions);
	else if ((most = policy_most_held(spec, name, sizeof(name))) && most < needed) {
		/* a round never cuts into the sinks and the hot window: a stream reaches one token past them,
		 * which is short of a cold block unless blocks hold one token */
		most = most > (uint64_t)sinks + window + 1 ? most : (uint64_t)sinks + window + 1;
		if (most >= needed)
			return 0;
		n = snprintf(why, AB_MESSAGE_MAX, "%s keeps at most %llu tokens per stream", name,
			     (unsigned long long)most);
	} else
		return 0;
	snprintf(why + n, AB_MESSAGE_MAX - (size_t)n, ", and a block turns cold only once a stream holds %llu "
		 "(sinks=%u + window=%u + block=%u)", (unsigned long long)needed, sinks, window, block);
	return 1;
}

/* ---- one spec ---- */

struct ab_cache {
	const kvp_plugin_v1 *api;
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
};

static void cache_close(struct ab_cache *c)
{
	if (c->seq)
		c->api->seq_close(c->seq);
	if (c->tenant)
		c->api->tenant_close(c->tenant);
	if (c->pool)
		c->api->pool_close(c->pool);
	memset(c, 0, sizeof(*c));
}

/* A refused spec or shape is bad input (2); anything else is a failure of the run (1). */
static int library_failed(const kvp_plugin_v1 *api, kvp_status st, const char *what,
			  char message[AB_MESSAGE_MAX])
{
	const char *detail = api->last_error();

	return ab_fail(message, st == KVP_EINVAL || st == KVP_EUNSUPPORTED ? 2 : 1, "%s: %s%s%s", what,
		       api->strerror(st), detail[0] ? ": " : "", detail);
}

static int cache_open(struct ab_cache *c, const kvp_plugin_v1 *api, const char *pool_spec, const char *spec,
		      const kvp_shape *shape, char message[AB_MESSAGE_MAX])
{
	kvp_status st;

	memset(c, 0, sizeof(*c));
	c->api = api;
	if ((st = api->pool_open(pool_spec, &c->pool)) != KVP_OK)
		return library_failed(api, st, "pool", message);
	if ((st = api->tenant_open(c->pool, "ab", spec, &c->tenant)) != KVP_OK)
		return library_failed(api, st, "cache", message);
	if ((st = api->seq_open(c->tenant, shape, &c->seq)) != KVP_OK)
		return library_failed(api, st, "sequence", message);
	return 0;
}

int ab_check_spec(const kvp_plugin_v1 *api, const char *pool_spec, const char *spec, const kvp_shape *shape,
		  char message[AB_MESSAGE_MAX])
{
	struct ab_cache c;
	int rc = cache_open(&c, api, pool_spec, spec, shape, message);

	cache_close(&c);
	return rc;
}

static double relative_error(const float *got, const float *want, size_t n)
{
	double num = 0, den = 0;
	size_t i;

	for (i = 0; i < n; i++) {
		num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
		den += (double)want[i] * want[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Errors accumulated over the checked (step, layer) pairs. */
struct error_sum {
	double sum, max;
	uint64_t n;
};

/* The library calls of one step; *seconds grows by their time. */
static int cache_step(struct ab_cache *c, const kvp_shape *s, int32_t pos, struct step_buffers *b, int check,
		      struct ab_bytes_meter *meter, double *seconds, char message[AB_MESSAGE_MAX])
{
	kvp_stats stats = { .size = sizeof(stats) };
	size_t nkv = (size_t)s->n_kv_heads * s->head_dim, nq = (size_t)s->n_heads * s->head_dim;
	double t0 = ab_now();
	kvp_status st = KVP_OK;
	uint32_t l;

	for (l = 0; l < s->n_layers && !st; l++) {
		st = c->api->append(c->seq, l, 1, &pos, b->k + l * nkv, b->v + l * nkv);
		if (!st && check)
			st = c->api->attend(c->seq, l, b->q + l * nq, b->out + l * nq);
	}
	*seconds += ab_now() - t0;
	/* the bytes of this position, before the step's round: untimed, it is the runner's call */
	if (!st)
		st = c->api->seq_stats(c->seq, &stats);
	if (!st)
		ab_bytes_sample(meter, &stats);
	t0 = ab_now();
	if (!st)
		st = c->api->seq_step(c->seq);
	*seconds += ab_now() - t0;
	if (st) {
		char what[64];

		snprintf(what, sizeof(what), "position %d", pos);
		return library_failed(c->api, st, what, message);
	}
	return 0;
}

static void add_errors(struct error_sum *e, const kvp_shape *s, const float *got, const float *want)
{
	size_t width = (size_t)s->n_heads * s->head_dim;
	uint32_t l;

	for (l = 0; l < s->n_layers; l++) {
		double r = relative_error(got + l * width, want + l * width, width);

		e->sum += r;
		e->max = r > e->max ? r : e->max;
		e->n++;
	}
}

static int replay_steps(struct ab_cache *c, const struct ab_source *src, const struct ab_reference *ref,
			struct step_buffers *b, struct ab_result *out, struct ab_progress *progress,
			char message[AB_MESSAGE_MAX])
{
	size_t width = (size_t)src->shape.n_layers * src->shape.n_heads * src->shape.head_dim;
	struct error_sum e = { 0, 0, 0 };
	uint64_t step, checked = 0;
	double seconds = 0;
	int32_t pos;
	int rc = 0, check;

	for (step = 0; step < src->n_steps && !rc; step++) {
		if (src->read_step(src->ctx, &pos, b->q, b->k, b->v) <= 0)
			return source_failed(src, message);
		check = ab_checked_step(ref, step, src->n_steps);
		rc = cache_step(c, &src->shape, pos, b, check, &out->meter, &seconds, message);
		if (!rc && check)
			add_errors(&e, &src->shape, b->out, ref->outputs + checked++ * width);
		ab_progress_advance(progress, 1, NULL); /* the caller's label: which spec of how many */
	}
	out->attention_error = e.n ? e.sum / (double)e.n : NAN;
	out->attention_error_max = e.n ? e.max : NAN;
	out->tokens_per_s = seconds > 0 ? (double)src->n_steps / seconds : 0;
	return rc;
}

int ab_replay_spec(const kvp_plugin_v1 *api, const char *pool_spec, const struct ab_source *src,
		   const struct ab_reference *ref, const char *spec, int heads, struct ab_result *out,
		   struct ab_progress *progress, char message[AB_MESSAGE_MAX])
{
	kvp_stats st = { .size = sizeof(st) };
	struct step_buffers b = { 0 };
	struct ab_cache c;
	int rc;

	memset(out, 0, sizeof(*out));
	out->spec = spec;
	out->kl_mean = out->kl_p99 = out->top1 = NAN; /* a trace has no logits */
	rc = cache_open(&c, api, pool_spec, spec, &src->shape, message);
	if (!rc && buffers_open(&b, &src->shape))
		rc = ab_fail(message, 1, "no memory for one step");
	if (!rc && src->rewind(src->ctx))
		rc = source_failed(src, message);
	if (!rc)
		rc = replay_steps(&c, src, ref, &b, out, progress, message);
	if (!rc && api->seq_stats(c.seq, &st) != KVP_OK)
		rc = ab_fail(message, 1, "stats: %s", api->last_error());
	if (!rc)
		ab_result_bytes(out, &st, src->n_steps);
	if (!rc && heads && ab_heads_read(api, c.seq, &src->shape, &out->heads))
		rc = ab_fail(message, 1, "no memory for the heads' levels");
	buffers_close(&b);
	cache_close(&c);
	return rc;
}
