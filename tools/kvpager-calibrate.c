/*
 * kvpager-calibrate — TriAttention statistics for a llama2.c checkpoint: runs the model over text and
 * writes the .kvtria file (DESIGN.md) that triattention(stats=FILE) reads.
 *
 *   kvpager-calibrate --out FILE [--model PATH] [--tokenizer PATH]
 *                     [--text FILE [--max-tokens N] | --prompt TEXT [--steps N]] [--quiet]
 *
 * Queries are captured right before RoPE (the forward pass's LLAMA_TAP_Q_PRE_ROPE observer), as the spec
 * recommends: per (layer, query head, band) the complex mean E[q_f] and the mean magnitude E|q_f|, summed
 * in double over every position. Bands follow the model's layout (llama2.c: interleaved pairs).
 *
 * --text FILE: the text is tokenized once (BOS first) and run teacher-forced in windows of the model's
 * seq_len positions, each window a fresh sequence starting at position 0, up to --max-tokens tokens
 * (default 32768, the reference calibrator's limit). Without --text: the prompt (default "Once upon a
 * time") and greedy continuation up to --steps positions (default 256). Defaults for the model follow
 * kvpager-llama ($KVP_MODELS/stories260K.bin, tok512.bin next to it). After writing, the file is read
 * back through the library's reader and checked against the model's shape. On a terminal, stderr shows
 * the tokens run of all, the rate and an ETA while it runs (--quiet: nothing).
 *
 * Exit status: 0 written, 2 bad input (options, checkpoint, tokenizer, text, output path), 1 otherwise.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"
#include "tools/ab.h"
#include "tools/cli.h"
#include "tools/llama.h"

#define TEXT_MAX (1u << 20) /* bytes; the tokenizer's merge loop is quadratic in the worst case */

struct options {
	const char *model, *tokenizer, *text, *prompt, *out;
	char model_buf[CLI_PATH_CAP], tokenizer_buf[CLI_PATH_CAP];
	long steps, max_tokens;
	int quiet;
};

/* Running sums per (layer, head, band), and how many queries each head saw. */
struct query_sums {
	kvp_shape shape;
	double *re, *im, *abs;
	uint64_t queries; /* per head: every head sees every position */
};

struct run {
	struct options opt;
	struct llama_model model;
	struct llama_tokenizer tokenizer;
	struct llama_state state;
	struct llama_dense_cache cache;
	struct query_sums sums;
	struct ab_progress progress; /* tokens run of all, an ETA; on a terminal, unless --quiet */
	int *ids;
	int n_ids;
};

static void usage(FILE *f)
{
	fputs("usage: kvpager-calibrate --out FILE [options]\n"
	      "  --out FILE         the .kvtria statistics file to write\n"
	      "  --model PATH       llama2.c checkpoint (default $KVP_MODELS/stories260K.bin)\n"
	      "  --tokenizer PATH   tokenizer (default tok512.bin next to the model)\n"
	      "  --text FILE        calibration text, run teacher-forced (at most 1 MiB)\n"
	      "  --max-tokens N     tokens of --text to use (default 32768)\n"
	      "  --prompt TEXT      without --text: prompt to continue greedily (default \"Once upon a time\")\n"
	      "  --steps N          without --text: positions to run, prompt included (default 256)\n"
	      "  --quiet            no progress line and no summary on stderr (the progress line, on a\n"
	      "                     terminal: tokens run of all, the rate and an ETA, once the run has\n"
	      "                     taken a second: KVP_PROGRESS_AFTER=SECONDS sets when)\n", f);
}

static int parse_count(const char *s, long hi, long *out)
{
	return cli_parse_long(s, 1, hi, out);
}

static int parse_valued(struct options *o, const char *name, const char *val)
{
	if (!strcmp(name, "--model"))
		o->model = val;
	else if (!strcmp(name, "--tokenizer"))
		o->tokenizer = val;
	else if (!strcmp(name, "--text"))
		o->text = val;
	else if (!strcmp(name, "--prompt"))
		o->prompt = val;
	else if (!strcmp(name, "--out"))
		o->out = val;
	else if (!strcmp(name, "--steps") && parse_count(val, INT_MAX, &o->steps))
		return cli_bad_input("--steps wants a positive integer, not '%s'", val);
	else if (!strcmp(name, "--max-tokens") && parse_count(val, INT_MAX / 2, &o->max_tokens))
		return cli_bad_input("--max-tokens wants a positive integer, not '%s'", val);
	return 0;
}

static int parse_options(struct options *o, int argc, char **argv)
{
	static const char *const valued[] = { "--model", "--tokenizer", "--text", "--prompt", "--out", "--steps",
					      "--max-tokens" };

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		size_t v;
		if (!strcmp(a, "--quiet")) {
			o->quiet = 1;
			continue;
		}
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			exit(0);
		}
		for (v = 0; v < sizeof valued / sizeof valued[0] && strcmp(a, valued[v]); v++)
			;
		if (v == sizeof valued / sizeof valued[0]) {
			usage(stderr);
			return cli_bad_input("unknown option '%s'", a);
		}
		if (i + 1 >= argc)
			return cli_bad_input("%s needs a value", a);
		int rc = parse_valued(o, a, argv[++i]);
		if (rc)
			return rc;
	}
	if (!o->out)
		return cli_bad_input("--out FILE is required (where to write the statistics)");
	if (o->text && o->prompt)
		return cli_bad_input("give --text or --prompt, not both");
	return 0;
}

static int default_paths(struct options *o)
{
	const char *models = getenv("KVP_MODELS");
	int n;

	if (!o->model) {
		n = snprintf(o->model_buf, CLI_PATH_CAP, "%s/stories260K.bin", models && models[0] ? models : "../shared/models");
		if (n < 0 || n >= CLI_PATH_CAP)
			return cli_bad_input("KVP_MODELS is too long");
		o->model = o->model_buf;
	}
	if (!o->tokenizer) {
		if (cli_beside(o->model, "tok512.bin", o->tokenizer_buf))
			return cli_bad_input("model path too long: %s", o->model);
		o->tokenizer = o->tokenizer_buf;
	}
	return 0;
}

/* ---- the statistics ---- */

static int sums_init(struct query_sums *s, const kvp_shape *shape)
{
	size_t n = (size_t)shape->n_layers * shape->n_heads * (shape->head_dim / 2);

	s->shape = *shape;
	s->queries = 0;
	s->re = calloc(n, sizeof(double));
	s->im = calloc(n, sizeof(double));
	s->abs = calloc(n, sizeof(double));
	return s->re && s->im && s->abs ? 0 : -1;
}

static void sums_free(struct query_sums *s)
{
	free(s->re), free(s->im), free(s->abs);
}

/* Observer: adds one position's pre-RoPE queries of one layer. */
static void capture(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct query_sums *s = ctx;
	unsigned hd = s->shape.head_dim, F = hd / 2;

	(void)pos, (void)n;
	if (tap != LLAMA_TAP_Q_PRE_ROPE)
		return;
	for (unsigned h = 0; h < s->shape.n_heads; h++) {
		const float *q = x + (size_t)h * hd;
		size_t at = ((size_t)layer * s->shape.n_heads + h) * F;
		for (unsigned f = 0; f < F; f++) {
			double re = s->shape.rope_layout == KVP_ROPE_HALF ? q[f] : q[2 * f];
			double im = s->shape.rope_layout == KVP_ROPE_HALF ? q[f + F] : q[2 * f + 1];
			s->re[at + f] += re;
			s->im[at + f] += im;
			s->abs[at + f] += sqrt(re * re + im * im);
		}
	}
	if (layer == 0)
		s->queries++;
}

/* Means into a stats struct, written and read back through the library. */
static int write_stats(struct run *r)
{
	const kvp_shape *sh = &r->sums.shape;
	struct kvp_tria_stats st, check;
	size_t n = (size_t)sh->n_layers * sh->n_heads * (sh->head_dim / 2);
	double q = (double)r->sums.queries;
	kvp_status s;

	if (kvp_tria_stats_alloc(&st, sh->n_layers, sh->n_heads, sh->head_dim, sh->rope_layout, sh->rope_theta))
		return 1;
	for (size_t i = 0; i < n; i++) {
		st.mean_re[i] = (float)(r->sums.re[i] / q);
		st.mean_im[i] = (float)(r->sums.im[i] / q);
		st.abs_mean[i] = (float)(r->sums.abs[i] / q);
	}
	s = kvp_tria_stats_write(r->opt.out, &st);
	kvp_tria_stats_free(&st);
	if (s != KVP_OK)
		return cli_bad_input("%s", kvp_last_error());
	s = kvp_tria_stats_read(r->opt.out, sh, &check);
	if (s != KVP_OK) {
		fprintf(stderr, "kvpager-calibrate: the file written does not read back: %s\n", kvp_last_error());
		return 1;
	}
	if (!r->opt.quiet) {
		double mrl = 0;
		for (uint32_t l = 0; l < sh->n_layers; l++)
			for (uint32_t h = 0; h < sh->n_kv_heads; h++)
				mrl += kvp_gate_mrl(&check, l, h, sh->n_kv_heads);
		fprintf(stderr, "kvpager-calibrate: %llu positions, %u layers x %u heads x %u bands -> %s "
			"(mean resultant length over KV heads %.3f)\n", (unsigned long long)r->sums.queries,
			sh->n_layers, sh->n_heads, sh->head_dim / 2, r->opt.out,
			mrl / (sh->n_layers * sh->n_kv_heads));
	}
	kvp_tria_stats_free(&check);
	return 0;
}

/* ---- the token stream ---- */

static int read_text(const char *path, char **out)
{
	FILE *f = fopen(path, "rb");
	size_t n;
	char *buf;

	if (!f)
		return cli_bad_input("cannot open --text %s: %s", path, strerror(errno));
	buf = malloc(TEXT_MAX + 2);
	if (!buf) {
		fclose(f);
		return 1;
	}
	n = fread(buf, 1, TEXT_MAX + 1, f);
	fclose(f);
	if (n > TEXT_MAX || n == 0 || memchr(buf, '\0', n)) {
		free(buf);
		return cli_bad_input("--text %s: %s", path, n == 0 ? "is empty" : n > TEXT_MAX ? "is larger than 1 MiB" :
			"holds NUL bytes (not text)");
	}
	buf[n] = '\0';
	*out = buf;
	return 0;
}

static int tokenize(struct run *r, const char *text)
{
	r->ids = malloc(sizeof(int) * (strlen(text) + 3));
	if (!r->ids)
		return 1;
	r->n_ids = llama_encode(&r->tokenizer, text, 1, 0, r->ids);
	if (r->n_ids < 2)
		return cli_bad_input("the calibration text encodes to no tokens");
	if (r->n_ids > r->opt.max_tokens)
		r->n_ids = (int)r->opt.max_tokens;
	return 0;
}

/* Teacher-forced over the text in windows of seq_len positions. */
static int run_text(struct run *r, const struct llama_attention *att, const struct llama_observer *obs)
{
	int seq = r->model.config.seq_len;

	for (int i = 0; i < r->n_ids; i++) {
		if (llama_forward(&r->model, &r->state, att, obs, r->ids[i], i % seq) != LLAMA_OK) {
			ab_progress_end(&r->progress);
			fprintf(stderr, "kvpager-calibrate: forward pass failed at token %d\n", i);
			return 1;
		}
		ab_progress_advance(&r->progress, 1, NULL);
	}
	ab_progress_end(&r->progress);
	return 0;
}

/* The prompt, then greedy tokens, up to steps positions. */
static int run_generated(struct run *r, const struct llama_attention *att, const struct llama_observer *obs)
{
	int token = r->ids[0];

	for (int pos = 0; pos < r->opt.steps; pos++) {
		if (llama_forward(&r->model, &r->state, att, obs, token, pos) != LLAMA_OK) {
			ab_progress_end(&r->progress);
			fprintf(stderr, "kvpager-calibrate: forward pass failed at position %d\n", pos);
			return 1;
		}
		token = pos + 1 < r->n_ids ? r->ids[pos + 1] : llama_argmax(r->state.logits, r->model.config.vocab_size);
		ab_progress_advance(&r->progress, 1, NULL);
	}
	ab_progress_end(&r->progress);
	return 0;
}

static int load(struct run *r)
{
	char err[LLAMA_ERROR_MAX] = "";
	kvp_shape shape;

	if (llama_model_load(&r->model, r->opt.model, err))
		return cli_bad_input("%s", err);
	if (llama_tokenizer_load(&r->tokenizer, r->opt.tokenizer, r->model.config.vocab_size, err))
		return cli_bad_input("%s", err);
	if (!r->opt.text && r->opt.steps > r->model.config.seq_len)
		return cli_bad_input("--steps %ld exceeds the model's %d positions", r->opt.steps, r->model.config.seq_len);
	shape = llama_model_shape(&r->model.config);
	if (llama_state_init(&r->state, &r->model.config) || llama_dense_cache_init(&r->cache, &r->model.config) ||
	    sums_init(&r->sums, &shape)) {
		fputs("kvpager-calibrate: out of memory\n", stderr);
		return 1;
	}
	return 0;
}

static int calibrate(struct run *r)
{
	struct llama_attention att;
	struct llama_observer obs = { .ctx = &r->sums, .observe = capture };
	char *text = NULL;
	int rc = default_paths(&r->opt);

	if (!rc && r->opt.text)
		rc = read_text(r->opt.text, &text);
	if (!rc)
		rc = load(r);
	if (!rc)
		rc = tokenize(r, text ? text : r->opt.prompt ? r->opt.prompt : "Once upon a time");
	free(text);
	if (rc)
		return rc;
	att = llama_dense_attention(&r->cache);
	ab_progress_start(&r->progress, (uint64_t)(r->opt.text ? r->n_ids : r->opt.steps), !r->opt.quiet);
	snprintf(r->progress.label, sizeof(r->progress.label), "calibrating %s", r->opt.model);
	rc = r->opt.text ? run_text(r, &att, &obs) : run_generated(r, &att, &obs);
	return rc ? rc : write_stats(r);
}

int main(int argc, char **argv)
{
	static struct run r;
	int rc;

	cli_program = "kvpager-calibrate";
	r.opt.steps = 256;
	r.opt.max_tokens = 32768;
	rc = parse_options(&r.opt, argc, argv);
	if (!rc)
		rc = calibrate(&r);
	free(r.ids);
	sums_free(&r.sums);
	llama_dense_cache_free(&r.cache);
	llama_state_free(&r.state);
	llama_tokenizer_free(&r.tokenizer);
	llama_model_free(&r.model);
	return rc;
}
