/*
 * tools/ab_text.c — perplexity over a text file for kvpager-ab --text, computed as llama.cpp's
 * llama-perplexity computes it, so the figures sit beside other engines' on the same model and file:
 * the whole file tokenized at once, cut into chunks of n_ctx tokens, each chunk's first token replaced
 * by BOS, the second half of each chunk's predictions scored (see ab.h for the exact positions).
 *
 * The full cache runs each chunk first and leaves its log-probabilities; each spec then runs the same
 * chunk and is scored against the text (perplexity) and against those log-probabilities (KL, top-1).
 * Working chunk by chunk keeps memory at one chunk's distributions whatever the file's length.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tools/ab.h"

static int text_fail(char message[AB_MESSAGE_MAX], int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int text_fail(char message[AB_MESSAGE_MAX], int status, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(message, AB_MESSAGE_MAX, fmt, ap);
	va_end(ap);
	return status;
}

void ab_log_softmax(const float *logits, int n, float *out)
{
	float max = logits[llama_argmax(logits, n)];
	double sum = 0;
	int i;

	for (i = 0; i < n; i++)
		sum += exp((double)logits[i] - max);
	for (i = 0; i < n; i++)
		out[i] = (float)((double)logits[i] - max - log(sum));
}

static int compare_doubles(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

double ab_percentile99(double *x, int n)
{
	int rank = (int)ceil(0.99 * n);

	if (n <= 0)
		return NAN;
	qsort(x, (size_t)n, sizeof(double), compare_doubles);
	return x[rank > 0 ? rank - 1 : 0];
}

/* ---- the text ---- */

/* The whole file, NUL-terminated, into *out. */
static int read_text(const char *path, char **out, size_t *len, char message[AB_MESSAGE_MAX])
{
	FILE *f = fopen(path, "rb");
	size_t cap = 1 << 16, n = 0, got;
	char *buf = NULL, *grown;

	if (!f)
		return text_fail(message, 2, "cannot open the text %s: %s", path, strerror(errno));
	do {
		if (!(grown = realloc(buf, cap + 1))) {
			free(buf);
			fclose(f);
			return text_fail(message, 1, "no memory for the text %s", path);
		}
		buf = grown;
		n += got = fread(buf + n, 1, cap - n, f);
		cap = n == cap ? 2 * cap : cap;
	} while (got > 0);
	if (ferror(f)) {
		free(buf);
		fclose(f);
		return text_fail(message, 2, "cannot read the text %s: %s", path, strerror(errno));
	}
	fclose(f);
	buf[n] = '\0';
	*out = buf;
	*len = n;
	return 0;
}

static int check_text(const char *path, const char *text, size_t len, char message[AB_MESSAGE_MAX])
{
	if (!len)
		return text_fail(message, 2, "the text %s is empty", path);
	if (strlen(text) != len)
		return text_fail(message, 2, "the text %s holds a NUL byte at offset %zu: not a text file", path,
				 strlen(text));
	return 0;
}

int ab_text_open(struct ab_text *t, const struct llama_tokenizer *tok, const char *path, int n_ctx,
		 int max_chunks, char message[AB_MESSAGE_MAX])
{
	char *text = NULL;
	size_t len = 0;
	int rc;

	memset(t, 0, sizeof(*t));
	t->n_ctx = n_ctx;
	rc = read_text(path, &text, &len, message);
	if (!rc)
		rc = check_text(path, text, len, message);
	if (!rc && !(t->tokens = malloc(sizeof(int) * (len + 3))))
		rc = text_fail(message, 1, "no memory for the tokens of %s", path);
	if (!rc && (t->n_tokens = llama_encode(tok, text, 1, 0, t->tokens)) < 0)
		rc = text_fail(message, 1, "no memory to tokenize %s", path);
	free(text);
	if (!rc && t->n_tokens < n_ctx)
		rc = text_fail(message, 2, "the text %s is %d tokens (BOS included): shorter than one chunk of %d "
			       "tokens", path, t->n_tokens, n_ctx);
	if (rc) {
		ab_text_close(t);
		return rc;
	}
	t->n_chunks = t->n_tokens / n_ctx;
	if (max_chunks > 0 && max_chunks < t->n_chunks)
		t->n_chunks = max_chunks;
	return 0;
}

void ab_text_close(struct ab_text *t)
{
	free(t->tokens);
	t->tokens = NULL;
}

int ab_text_first_scored(const struct ab_text *t)
{
	return t->n_ctx / 2;
}

int ab_text_scored_per_chunk(const struct ab_text *t)
{
	return t->n_ctx - 1 - t->n_ctx / 2;
}

int ab_text_token(const struct ab_text *t, int chunk, int pos)
{
	return pos ? t->tokens[(size_t)chunk * (size_t)t->n_ctx + (size_t)pos] : LLAMA_TOKEN_BOS;
}

/* ---- scoring ---- */

int ab_text_model_open(struct ab_text_model *m, const struct llama_model *model, const struct ab_text *t)
{
	size_t vocab = (size_t)model->config.vocab_size;

	memset(m, 0, sizeof(*m));
	m->model = model;
	m->reference = malloc(sizeof(float) * vocab * (size_t)ab_text_scored_per_chunk(t));
	m->log_probs = malloc(sizeof(float) * vocab);
	if (m->reference && m->log_probs && !llama_state_init(&m->state, &model->config))
		return 0;
	ab_text_model_close(m);
	return -1;
}

void ab_text_model_close(struct ab_text_model *m)
{
	free(m->reference);
	free(m->log_probs);
	if (m->model)
		llama_state_free(&m->state);
	memset(m, 0, sizeof(*m));
}

int ab_text_score_open(struct ab_text_score *s, const struct ab_text *t)
{
	memset(s, 0, sizeof(*s));
	s->summed.size = sizeof(s->summed);
	s->kl = malloc(sizeof(double) * (size_t)t->n_chunks * (size_t)ab_text_scored_per_chunk(t));
	return s->kl ? 0 : -1;
}

void ab_text_score_close(struct ab_text_score *s)
{
	free(s->kl);
	s->kl = NULL;
}

/* The prediction of the logits at pos (scored row `row`) for the next token. */
static void score_position(struct ab_text_model *m, const struct ab_text *t, int chunk, int pos, int row,
			   int is_reference, struct ab_text_score *s)
{
	int vocab = m->model->config.vocab_size, i;
	float *lp = is_reference ? m->reference + (size_t)row * (size_t)vocab : m->log_probs;
	const float *ref = m->reference + (size_t)row * (size_t)vocab;
	double kl = 0;

	ab_log_softmax(m->state.logits, vocab, lp);
	s->nll -= lp[ab_text_token(t, chunk, pos + 1)];
	if (!is_reference) {
		for (i = 0; i < vocab; i++)
			kl += exp((double)ref[i]) * ((double)ref[i] - lp[i]);
		kl = kl > 0 ? kl : 0.0; /* rounding can leave -1e-9 where the distributions are equal */
		s->agreed += llama_argmax(ref, vocab) == llama_argmax(lp, vocab);
	} else {
		s->agreed++;
	}
	s->kl[s->n_scored++] = kl;
	s->kl_sum += kl;
}

int ab_text_run_chunk(struct ab_text_model *m, const struct ab_text *t, int chunk,
		      const struct llama_attention *att, int is_reference, struct ab_text_score *s,
		      struct ab_progress *progress, const char *label)
{
	int first = ab_text_first_scored(t), pos, rc = 0;
	double t0 = ab_now();

	for (pos = 0; pos < t->n_ctx && !rc; pos++) {
		rc = llama_forward(m->model, &m->state, att, NULL, ab_text_token(t, chunk, pos), pos);
		if (!rc && pos >= first && pos + 1 < t->n_ctx)
			score_position(m, t, chunk, pos, pos - first, is_reference, s);
		ab_progress_advance(progress, 1, label);
	}
	s->seconds += ab_now() - t0;
	return rc;
}

/* ---- results ---- */

void ab_text_add_stats(struct ab_text_score *s, const kvp_stats *st, const struct ab_bytes_meter *chunk)
{
	uint64_t held = st->bytes_exact + st->bytes_compressed + st->bytes_meta;

	s->end_held_peak = held > s->end_held_peak ? held : s->end_held_peak;
	ab_bytes_merge(&s->meter, chunk);
	s->summed.tokens_appended += st->tokens_appended;
	s->summed.tokens_retained += st->tokens_retained;
	s->summed.bytes_exact += st->bytes_exact;
	s->summed.bytes_compressed += st->bytes_compressed;
	s->summed.bytes_meta += st->bytes_meta;
	s->summed.bytes_spilled += st->bytes_spilled;
	s->summed.bytes_dense_fp16 += st->bytes_dense_fp16;
}

void ab_text_result(const struct ab_text_score *s, const struct ab_text *t, struct ab_result *r)
{
	int n = (int)s->n_scored;

	r->meter = s->meter;
	ab_result_bytes(r, &s->summed, (uint64_t)t->n_chunks * (uint64_t)t->n_ctx);
	/* the summed end-of-chunk stats add up sequences that never lived at once: the peak is one chunk's */
	r->bytes_peak = s->meter.held_peak > s->end_held_peak ? s->meter.held_peak : s->end_held_peak;
	r->bytes_per_token_peak = s->meter.positions ? (double)r->bytes_peak / t->n_ctx : NAN;
	/* the merged first samples are every chunk's: one sequence's is their mean */
	r->meta_sequence /= t->n_chunks;
	r->perplexity = n ? exp(s->nll / n) : NAN;
	r->kl_mean = n ? s->kl_sum / n : NAN;
	r->kl_p99 = ab_percentile99(s->kl, n);
	r->top1 = n ? (double)s->agreed / n : NAN;
	r->attention_error = r->attention_error_max = NAN; /* not measured here */
	r->tokens_per_s = s->seconds > 0 ? (double)r->tokens / s->seconds : 0;
}

void ab_print_text_table(FILE *f, const char *title, double full_perplexity, const struct ab_result *r, int n)
{
	int width = ab_label_width(n), i;
	char label[16];

	fprintf(f, "%s\n", title);
	fprintf(f, "%-*s %10s %9s %9s %9s %8s %11s %8s %8s\n", width, "spec", "perplexity", "vs full", "KL mean",
		"KL p99", "top-1", "bytes/tok", "vs fp16", "tok/s");
	fprintf(f, "%-*s %10.6f\n", width, "full", full_perplexity);
	for (i = 0; i < n; i++) {
		snprintf(label, sizeof(label), "S%d", i + 1);
		fprintf(f, "%-*s %10.6f %+8.3f%% %9.2e %9.2e %7.2f%% %11.1f %7.2fx %8.0f\n", width, label,
			r[i].perplexity, 100.0 * (r[i].perplexity / full_perplexity - 1.0), r[i].kl_mean, r[i].kl_p99,
			100.0 * r[i].top1, r[i].bytes_per_token, r[i].compression, r[i].tokens_per_s);
	}
	fputs("full: the full cache (exact attention over every token), the reference of KL and top-1\n", f);
	ab_print_spec_key(f, r, n);
	fputs("bytes/tok: the mean over every position of every chunk (bytes held after each position, summed, "
	      "over the positions summed); vs fp16: on the mean\n", f);
}
