/*
 * kvpager-ab — the A/B runner: the same token stream through several KV-cache specs of the kvpager
 * plugin (dlopen + the kvp_plugin_v1 table), each measured against the exact (full) cache.
 *
 *   kvpager-ab [--model PATH [--tokenizer PATH] [--prompt TEXT] [--steps N | --text FILE [--ctx N]
 *               [--chunks N]] | --trace FILE | --tokens N --seed N] [--spec SPEC]... [--every N]
 *              [--plugin PATH] [--pool SPEC] [--csv FILE] [--plot FILE.svg] [--report FILE.html] [--heads]
 *              [--quiet]
 *   kvpager-ab --prefix-share --model PATH (--prompt TEXT | --text FILE [--ctx N]) [--prompts K] [--steps N]
 *              [--spec SPEC] [--pool SPEC] [--plugin PATH]
 *
 * Three sources of the stream:
 *   --model   a llama2.c checkpoint: the full cache (an exact in-process dense cache) generates greedily
 *             from the prompt, and every spec is teacher-forced on those tokens; per position the
 *             runner compares next-token distributions (KL, top-1) and every layer's attention output.
 *             With --text, perplexity over a file instead, as llama.cpp's llama-perplexity computes it
 *             (tools/ab_text.c), each spec with KL and top-1 against the full cache on the scored
 *             positions.
 *   --trace   a recorded trace (include/kvpager_trace.h; kvpager-llama --record writes one): queries,
 *             keys and values are replayed; the reference is exact attention computed from the trace.
 *             A trace has no logits, so KL and top-1 are n/a.
 *   neither   the built-in synthetic trace (tools/synthetic.h): 8192 tokens of 2 layers, 8 query and
 *             2 KV heads of dimension 128 with RoPE, per-band query concentration, outlier key
 *             channels, attention sinks and heavy hitters; compared like a trace.
 * Without --spec, the seven default_specs below are compared: the exact cache (store=fp32), cold tiers of
 * TurboQuant 4 and 3 bits and KIVI 2 bits (the default block=64, sinks=4, window=128), StreamingLLM and
 * TriAttention at 2048 tokens, and TriAttention with TurboQuant 3 bits. Options take their value as the
 * next argument or after '=' (--spec=SPEC).
 *
 * --prefix-share: K prompts sharing their first 3/4 through the prefix cache (tools/ab_prefix.c): the hit
 * rate, the prefill tokens saved, and whether each prompt's greedy tokens equal a run without the cache.
 *
 * Exit status: 0 done, 2 bad input (options, files, a spec the library refuses, such as a policy it
 * does not serve yet), 1 any other failure.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "tools/ab.h"
#include "tools/cli.h"
#include "tools/llama.h"
#include "tools/synthetic.h"
#include "tools/trace.h"

#define MAX_SPECS 64
#define SYNTHETIC_TOKENS 8192
#define SYNTHETIC_EVERY 64

/* The three axes alone and together: codecs, policies at a quarter of the tokens, and both. */
static const char *const default_specs[] = {
	"store=fp32",
	"k=turboquant(bits=4),v=turboquant(bits=4)",
	"k=turboquant(bits=3),v=turboquant(bits=3)",
	"k=kivi(bits=2),v=kivi(bits=2)",
	"policy=streaming(sinks=4,window=2044)",
	"policy=triattention(budget=2048,stats=online)",
	"policy=triattention(budget=2048,stats=online),k=turboquant(bits=3),v=turboquant(bits=3)",
};

struct options {
	const char *model, *tokenizer, *prompt, *trace, *plugin, *pool, *csv, *plot, *report, *text;
	const char *specs[MAX_SPECS];
	int n_specs, quiet, seeded, heads, prefix_share;
	long steps, tokens, every, ctx, chunks, prompts;
	unsigned long long seed;
	char tokenizer_buf[CLI_PATH_CAP], plugin_buf[CLI_PATH_CAP];
};

static void usage(FILE *f)
{
	fputs("usage: kvpager-ab [source] [--spec SPEC]... [options]\n"
	      "Runs one token stream through each cache SPEC (a tenant spec of kvpager) and compares it with\n"
	      "the exact full cache: KV bytes per token, compression against dense fp16, next-token KL\n"
	      "(mean, p99) and top-1 agreement, attention-output relative error, tokens/s.\n"
	      "source (one of):\n"
	      "  --model PATH      llama2.c checkpoint; the full cache generates greedily, specs are\n"
	      "                    teacher-forced on its tokens\n"
	      "    --tokenizer PATH  (default tok512.bin next to the model)\n"
	      "    --prompt TEXT     (default none: start from BOS)\n"
	      "    --steps N         positions (default 256, at most the model's seq_len)\n"
	      "    --text FILE       perplexity over FILE instead, as llama.cpp's llama-perplexity computes\n"
	      "                      it: the whole file tokenized (BOS first), cut into chunks of N tokens\n"
	      "                      (a last partial chunk dropped), each chunk's first token replaced by\n"
	      "                      BOS, the logits at positions N/2 .. N-2 scored against the tokens that\n"
	      "                      follow; every spec with KL and top-1 against the full cache there\n"
	      "      --ctx N           the chunk length (default the model's seq_len; 3..seq_len)\n"
	      "      --chunks N        only the first N chunks (default all)\n"
	      "  --trace FILE      a recorded trace (format: include/kvpager_trace.h); KL and top-1 are n/a\n"
	      "  (none)            the built-in synthetic trace: 2 layers, 8 query heads, 2 KV heads,\n"
	      "                    head_dim 128, RoPE theta 500000; per-band query concentration aligned\n"
	      "                    with the keys (local attention), 4 outlier key channels per KV head,\n"
	      "                    4 attention-sink tokens, 3% heavy hitters (tools/synthetic.c)\n"
	      "    --tokens N        its length (default 8192)\n"
	      "    --seed N          its seed (default 1)\n"
	      "options:\n"
	      "  --spec SPEC       a cache spec to compare, repeatable (default: store=fp32,\n"
	      "                    k=turboquant(bits=4),v=turboquant(bits=4), the same at bits=3,\n"
	      "                    k=kivi(bits=2),v=kivi(bits=2), policy=streaming(sinks=4,window=2044),\n"
	      "                    policy=triattention(budget=2048,stats=online), and that with\n"
	      "                    k=turboquant(bits=3),v=turboquant(bits=3))\n"
	      "  --every N         attend and compare at every Nth step only (default 1; 64 for the\n"
	      "                    synthetic trace); every token is still appended\n"
	      "  --plugin PATH     kvpager plugin (default libkvpager.so.1 next to this program,\n"
	      "                    else the installed one)\n"
	      "  --pool SPEC       pool spec for every run (default \"\")\n"
	      "  --csv FILE        write the table as CSV (unmeasured values are empty fields)\n"
	      "  --plot FILE.svg   write an SVG plot of bytes per token against mean KL (against the\n"
	      "                    attention error when there is no KL), log axes, labels S1..Sn; with\n"
	      "                    --text a second plot, of bytes per token against perplexity\n"
	      "  --report FILE.html  write one self-contained page (no network): the table, sortable by\n"
	      "                    a click on a column, and the plot\n"
	      "  --heads           after the table, per spec and per layer and KV head: the gating it chose\n"
	      "                    at the end of the run (coherence, aggressiveness, ladder level and bits,\n"
	      "                    token budget; with --text, of the last chunk)\n"
	      "  --prefix-share    with --model: K prompts (--prompts K, default 8) of --ctx tokens of\n"
	      "                    --text FILE (default 256), or of --prompt TEXT's tokens, sharing their\n"
	      "                    first 3/4 and differing after it (the text that follows, or a changed\n"
	      "                    token), each through the prefix cache (seq_open_prefix on one tenant,\n"
	      "                    model= the checkpoint's file name, --spec's cache spec, default \"\"),\n"
	      "                    the forward pass over what it did not hold, then --steps greedy tokens\n"
	      "                    (default 16); prints n_cached per prompt, the hit rate and the prefill\n"
	      "                    tokens saved, and checks each prompt's greedy tokens against a run\n"
	      "                    without the cache (exit status 1 when one differs)\n"
	      "  --quiet           no progress line (on a terminal, stderr shows spec i of N, its label\n"
	      "                    S1..Sn and what sets it apart, tokens done of all, the rate, an ETA,\n"
	      "                    once the run has taken a second: KVP_PROGRESS_AFTER=SECONDS sets when)\n"
	      "The table labels the specs S1..Sn, as the plot does, and keys the labels to the full specs\n"
	      "under it; the CSV has every spec in full.\n"
	      "Exit status: 0 done, 2 bad input or a spec the library refuses, 1 other failures.\n", f);
}

static int parse_count(const char *name, const char *s, long hi, long *out)
{
	if (cli_parse_long(s, 1, hi, out))
		return cli_bad_input("%s wants an integer in 1..%ld, not '%s'", name, hi, s);
	return 0;
}

/* A chunk of n_ctx scores positions n_ctx/2 .. n_ctx-2: fewer than 3 tokens leave nothing to score. The
 * model's own limit is checked once it is loaded. */
static int parse_ctx(const char *s, long *out)
{
	if (cli_parse_long(s, 3, INT_MAX, out))
		return cli_bad_input("--ctx wants an integer of at least 3 (a chunk scores the predictions at "
				     "positions N/2 .. N-2), not '%s'", s);
	return 0;
}

static int parse_seed(const char *s, unsigned long long *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-')
		return cli_bad_input("--seed wants a non-negative integer, not '%s'", s);
	return 0;
}

static int add_spec(struct options *o, const char *spec)
{
	if (o->n_specs == MAX_SPECS)
		return cli_bad_input("at most %d --spec", MAX_SPECS);
	o->specs[o->n_specs++] = spec;
	return 0;
}

/* Options with a value; returns 0 or an exit status. */
static int parse_valued(struct options *o, const char *name, const char *val)
{
	static const struct {
		const char *name;
		size_t offset;
	} paths[] = {
		{ "--model", offsetof(struct options, model) },   { "--tokenizer", offsetof(struct options, tokenizer) },
		{ "--prompt", offsetof(struct options, prompt) }, { "--trace", offsetof(struct options, trace) },
		{ "--plugin", offsetof(struct options, plugin) }, { "--pool", offsetof(struct options, pool) },
		{ "--csv", offsetof(struct options, csv) },       { "--plot", offsetof(struct options, plot) },
		{ "--report", offsetof(struct options, report) },
		{ "--text", offsetof(struct options, text) },
	};
	size_t i;

	for (i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
		if (!strcmp(name, paths[i].name)) {
			*(const char **)((char *)o + paths[i].offset) = val;
			return 0;
		}
	if (!strcmp(name, "--spec"))
		return add_spec(o, val);
	if (!strcmp(name, "--steps"))
		return parse_count(name, val, INT_MAX, &o->steps);
	if (!strcmp(name, "--tokens"))
		return parse_count(name, val, INT32_MAX, &o->tokens);
	if (!strcmp(name, "--every"))
		return parse_count(name, val, INT32_MAX, &o->every);
	if (!strcmp(name, "--ctx"))
		return parse_ctx(val, &o->ctx);
	if (!strcmp(name, "--chunks"))
		return parse_count(name, val, INT_MAX, &o->chunks);
	if (!strcmp(name, "--prompts"))
		return parse_count(name, val, 4096, &o->prompts);
	if (!strcmp(name, "--seed")) {
		o->seeded = 1;
		return parse_seed(val, &o->seed);
	}
	return 0;
}

static int takes_value(const char *name)
{
	static const char *const valued[] = { "--model", "--tokenizer", "--prompt", "--trace", "--plugin",
					      "--pool", "--csv", "--plot", "--report", "--spec", "--steps",
					      "--tokens", "--every", "--seed", "--text", "--ctx", "--chunks", "--prompts" };
	size_t i;

	for (i = 0; i < sizeof(valued) / sizeof(valued[0]); i++)
		if (!strcmp(name, valued[i]))
			return 1;
	return 0;
}

/* --prefix-share runs a model on prompts from --prompt or --text, one cache spec, no table files. */
static int check_prefix_options(const struct options *o)
{
	if (o->prompts && !o->prefix_share)
		return cli_bad_input("--prompts counts the prompts of --prefix-share; give --prefix-share");
	if (!o->prefix_share)
		return 0;
	if (!o->model)
		return cli_bad_input("--prefix-share needs --model: its prompts run through the model");
	if (!o->text == !(o->prompt && o->prompt[0]))
		return cli_bad_input("--prefix-share takes its prompts from one of --prompt TEXT and --text FILE");
	if (o->ctx && !o->text)
		return cli_bad_input("--ctx is the prompts' length in tokens of --text; --prompt's are its own");
	if (o->n_specs > 1)
		return cli_bad_input("--prefix-share runs one cache spec, not %d", o->n_specs);
	if (o->chunks || o->every || o->heads || o->csv || o->plot || o->report)
		return cli_bad_input("--chunks, --every, --heads, --csv, --plot and --report are not for --prefix-share");
	return 0;
}

/* --text is a mode of --model; the greedy run's options do not apply to it. */
static int check_text_options(const struct options *o)
{
	if (o->text && !o->model)
		return cli_bad_input("--text needs --model: perplexity is the model's");
	if ((o->ctx || o->chunks) && !o->text)
		return cli_bad_input("--ctx and --chunks cut the --text file; give --text");
	if (o->text && (o->prompt || o->steps || o->every))
		return cli_bad_input("--prompt, --steps and --every shape the greedy run, not --text (its chunks "
				     "are --ctx tokens, every scored position compared)");
	if (o->model && o->every)
		return cli_bad_input("--every thins the comparisons of a trace; with --model every position is "
				     "compared (its KL needs each step's logits)");
	return 0;
}

static int parse_options(struct options *o, int argc, char **argv)
{
	int i, rc;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--prefix-share")) {
			o->prefix_share = 1;
			continue;
		}
		if (!strcmp(argv[i], "--quiet") || !strcmp(argv[i], "--heads")) {
			*(argv[i][2] == 'q' ? &o->quiet : &o->heads) = 1;
			continue;
		}
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			exit(0);
		}
		const char *eq = strchr(argv[i], '=');
		if (eq && !strncmp(argv[i], "--", 2)) { /* --name=value */
			char name[32];
			size_t len = (size_t)(eq - argv[i]);
			if (len >= sizeof(name) || (memcpy(name, argv[i], len), name[len] = '\0', !takes_value(name))) {
				usage(stderr);
				return cli_bad_input("unknown option '%.*s'", (int)len, argv[i]);
			}
			rc = parse_valued(o, name, eq + 1);
			if (rc)
				return rc;
			continue;
		}
		if (!takes_value(argv[i])) {
			usage(stderr);
			return cli_bad_input("unknown option '%s'", argv[i]);
		}
		if (i + 1 >= argc)
			return cli_bad_input("%s needs a value", argv[i]);
		rc = parse_valued(o, argv[i], argv[i + 1]);
		if (rc)
			return rc;
		i++;
	}
	if (o->model && o->trace)
		return cli_bad_input("--model and --trace are two sources; give one");
	if ((o->tokens || o->seeded) && (o->model || o->trace))
		return cli_bad_input("--tokens and --seed shape the synthetic trace, not a model or a trace");
	if (o->prefix_share || o->prompts)
		return check_prefix_options(o);
	return check_text_options(o);
}

/* dir of path with its trailing '/' into buf ("" when there is none) */
static int default_paths(struct options *o, const char *argv0)
{
	int w;

	if (o->model && !o->tokenizer) {
		if (cli_beside(o->model, "tok512.bin", o->tokenizer_buf))
			return cli_bad_input("model path too long: %s", o->model);
		o->tokenizer = o->tokenizer_buf;
	}
	if (!o->plugin) {
		if (cli_default_plugin(argv0, o->plugin_buf))
			return cli_bad_input("executable path too long: %s", argv0);
		o->plugin = o->plugin_buf;
	}
	if (!o->n_specs && o->prefix_share)
		o->specs[o->n_specs++] = "";
	if (!o->n_specs)
		for (w = 0; w < (int)(sizeof(default_specs) / sizeof(default_specs[0])); w++)
			o->specs[o->n_specs++] = default_specs[w];
	return 0;
}

/* Every spec is tried on the stream's shape before anything runs, so a refused one costs nothing; one
 * whose cold tier cannot be used in a run of `positions` is run, with a warning. */
static int check_specs(const struct options *o, const kvp_plugin_v1 *api, const kvp_shape *shape,
		       uint64_t positions)
{
	char message[AB_MESSAGE_MAX];
	int i, rc;

	for (i = 0; i < o->n_specs; i++) {
		rc = ab_check_spec(api, o->pool, o->specs[i], shape, message);
		if (rc) {
			fprintf(stderr, "kvpager-ab: spec '%s': %s\n", o->specs[i], message);
			return rc;
		}
		if (ab_cold_tier_unreachable(o->specs[i], positions, message))
			fprintf(stderr, "kvpager-ab: warning: spec '%s': its cold tier (k=/v=) can receive no "
				"block: %s\n", o->specs[i], message);
	}
	return 0;
}

/* The progress line's label while spec i runs. */
static void spec_progress(struct ab_progress *p, const struct options *o, int i)
{
	ab_progress_spec_label(p->label, sizeof(p->label), o->specs, o->n_specs, i);
}

/* ---- the model source ---- */

struct model_run {
	struct llama_model model;
	struct llama_tokenizer tokenizer;
	struct llama_state state;
	int *tokens;        /* [n]: the input at each position */
	int n, n_prompt;
	float *log_probs;   /* [n][vocab]: the full cache's next-token log-probabilities */
	float *attention;   /* [n][n_layers][dim]: the full cache's attention outputs */
	float *observed;    /* [n][n_layers][dim]: the spec's */
	double *kl;         /* [n] */
};

static int observed_index(const struct model_run *m, int pos, int layer)
{
	return (pos * m->model.config.n_layers + layer) * m->model.config.dim;
}

static void record_attention(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct model_run *m = ctx;

	if (tap == LLAMA_TAP_ATTENTION)
		memcpy(m->observed + observed_index(m, pos, layer), x, (size_t)n * sizeof(float));
}

static int model_alloc(struct model_run *m, int n)
{
	size_t vocab = (size_t)m->model.config.vocab_size;
	size_t att = (size_t)n * (size_t)m->model.config.n_layers * (size_t)m->model.config.dim;

	m->n = n;
	m->tokens = calloc((size_t)n + 1, sizeof(int));
	m->log_probs = malloc((size_t)n * vocab * sizeof(float));
	m->attention = malloc(att * sizeof(float));
	m->observed = malloc(att * sizeof(float));
	m->kl = malloc((size_t)n * sizeof(double));
	if (m->tokens && m->log_probs && m->attention && m->observed && m->kl &&
	    !llama_state_init(&m->state, &m->model.config))
		return 0;
	fputs("kvpager-ab: no memory for the model run\n", stderr);
	return 1;
}

static int checkpoint_load(struct llama_model *model, struct llama_tokenizer *tokenizer, const struct options *o)
{
	char err[LLAMA_ERROR_MAX];
	int rc;

	rc = llama_model_load(model, o->model, err);
	if (!rc)
		rc = llama_tokenizer_load(tokenizer, o->tokenizer, model->config.vocab_size, err);
	if (rc) {
		fprintf(stderr, "kvpager-ab: %s\n", err);
		return rc == LLAMA_EINPUT ? CLI_EXIT_BAD_INPUT : 1;
	}
	return 0;
}

static int model_load(struct model_run *m, const struct options *o)
{
	int rc, n, n_prompt;
	int *prompt;

	rc = checkpoint_load(&m->model, &m->tokenizer, o);
	if (rc)
		return rc;
	n = (int)(o->steps < m->model.config.seq_len ? o->steps : m->model.config.seq_len);
	if (model_alloc(m, n))
		return 1;
	prompt = malloc(sizeof(int) * (strlen(o->prompt) + 3));
	if (!prompt)
		return 1;
	n_prompt = llama_encode(&m->tokenizer, o->prompt, 1, 0, prompt);
	if (n_prompt > 0)
		memcpy(m->tokens, prompt, sizeof(int) * (size_t)(n_prompt < n ? n_prompt : n));
	free(prompt);
	m->n_prompt = n_prompt;
	return n_prompt < 0 ? 1 : 0;
}

/* The full cache: generates greedily after the prompt and keeps what every spec is compared with. */
static int model_reference(struct model_run *m, struct ab_progress *progress)
{
	struct llama_observer obs = { m, record_attention };
	struct llama_dense_cache dense;
	struct llama_attention att;
	int pos, vocab = m->model.config.vocab_size, rc = 0;

	if (llama_dense_cache_init(&dense, &m->model.config))
		return 1;
	att = llama_dense_attention(&dense);
	for (pos = 0; pos < m->n && !rc; pos++) {
		rc = llama_forward(&m->model, &m->state, &att, &obs, m->tokens[pos], pos);
		ab_log_softmax(m->state.logits, vocab, m->log_probs + (size_t)pos * (size_t)vocab);
		if (pos + 1 >= m->n_prompt)
			m->tokens[pos + 1] = llama_argmax(m->state.logits, vocab);
		ab_progress_advance(progress, 1, "full cache");
	}
	memcpy(m->attention, m->observed,
	       sizeof(float) * (size_t)m->n * (size_t)m->model.config.n_layers * (size_t)m->model.config.dim);
	llama_dense_cache_free(&dense);
	if (rc)
		fprintf(stderr, "kvpager-ab: the full-cache run failed at position %d (%d)\n", pos - 1, rc);
	return rc ? 1 : 0;
}

/* KL(full || spec) at pos, from the spec's logits; *agree is 1 when the argmaxes match. */
static double position_kl(struct model_run *m, int pos, float *log_probs, int *agree)
{
	int vocab = m->model.config.vocab_size, i;
	const float *ref = m->log_probs + (size_t)pos * (size_t)vocab;
	double kl = 0;

	ab_log_softmax(m->state.logits, vocab, log_probs);
	for (i = 0; i < vocab; i++)
		kl += exp((double)ref[i]) * ((double)ref[i] - log_probs[i]);
	*agree = llama_argmax(ref, vocab) == llama_argmax(log_probs, vocab);
	return kl > 0 ? kl : 0.0; /* rounding can leave -1e-9 where the distributions are equal */
}

static void attention_errors(const struct model_run *m, struct ab_result *r)
{
	int dim = m->model.config.dim, i, j, cells = m->n * m->model.config.n_layers;
	double sum = 0, max = 0;

	for (i = 0; i < cells; i++) {
		const float *a = m->attention + (size_t)i * (size_t)dim, *b = m->observed + (size_t)i * (size_t)dim;
		double num = 0, den = 0, e;

		for (j = 0; j < dim; j++) {
			num += ((double)b[j] - a[j]) * ((double)b[j] - a[j]);
			den += (double)a[j] * a[j];
		}
		e = den > 0 ? sqrt(num / den) : sqrt(num);
		sum += e;
		max = e > max ? e : max;
	}
	r->attention_error = sum / cells;
	r->attention_error_max = max;
}

/* The plugin's attention, with the sequence's bytes sampled after each position's appends, before the
 * step's round (struct ab_bytes_meter). */
struct metered_attention {
	struct llama_attention plugin;
	struct llama_plugin_cache *cache;
	struct ab_bytes_meter *meter;
};

static int metered_append(void *ctx, int layer, int pos, const float *k, const float *v)
{
	struct metered_attention *a = ctx;

	return a->plugin.append(a->plugin.ctx, layer, pos, k, v);
}

static int metered_attend(void *ctx, int layer, int pos, const float *q, float *out)
{
	struct metered_attention *a = ctx;

	return a->plugin.attend(a->plugin.ctx, layer, pos, q, out);
}

static int metered_step(void *ctx)
{
	struct metered_attention *a = ctx;
	struct llama_plugin_cache *c = a->cache;
	kvp_stats st = { .size = sizeof(st) };

	c->status = c->api->seq_stats(c->seq, &st);
	if (c->status != KVP_OK) {
		snprintf(c->message, sizeof(c->message), "stats: %s: %s", c->api->strerror(c->status),
			 c->api->last_error());
		return 1;
	}
	ab_bytes_sample(a->meter, &st);
	return a->plugin.step(a->plugin.ctx);
}

static int spec_forward(struct model_run *m, struct llama_plugin_cache *c, struct ab_result *r,
			struct ab_progress *progress)
{
	struct llama_observer obs = { m, record_attention };
	struct metered_attention metered = { llama_plugin_attention(c), c, &r->meter };
	struct llama_attention att = { &metered, metered_append, metered_attend, metered_step };
	float *log_probs = malloc(sizeof(float) * (size_t)m->model.config.vocab_size);
	int pos, agree, agreed = 0, rc = 0;
	double t0 = ab_now(), kl_sum = 0;

	if (!log_probs)
		return 1;
	for (pos = 0; pos < m->n && !rc; pos++) {
		rc = llama_forward(&m->model, &m->state, &att, &obs, m->tokens[pos], pos);
		if (rc)
			break;
		m->kl[pos] = position_kl(m, pos, log_probs, &agree);
		kl_sum += m->kl[pos];
		agreed += agree;
		ab_progress_advance(progress, 1, NULL);
	}
	r->tokens_per_s = m->n / (ab_now() - t0);
	free(log_probs);
	if (rc) {
		fprintf(stderr, "kvpager-ab: spec '%s': position %d: %s\n", r->spec, pos,
			rc == LLAMA_EATTENTION ? c->message : "the forward pass failed");
		return rc == LLAMA_EATTENTION && (c->status == KVP_EINVAL || c->status == KVP_EUNSUPPORTED)
			       ? CLI_EXIT_BAD_INPUT : 1;
	}
	r->kl_mean = kl_sum / m->n;
	r->top1 = (double)agreed / m->n;
	r->kl_p99 = ab_percentile99(m->kl, m->n);
	attention_errors(m, r);
	return 0;
}

static int model_spec(struct model_run *m, const kvp_plugin_v1 *api, const char *pool, const char *spec,
		      int heads, struct ab_result *r, struct ab_progress *progress)
{
	struct llama_plugin_cache c;
	kvp_stats st = { .size = sizeof(st) };
	int rc;

	memset(r, 0, sizeof(*r));
	r->spec = spec;
	rc = llama_plugin_cache_open(&c, api, &m->model.config, pool, spec);
	if (rc) {
		fprintf(stderr, "kvpager-ab: spec '%s': %s\n", spec, c.message);
		return rc == LLAMA_EINPUT ? CLI_EXIT_BAD_INPUT : 1;
	}
	r->perplexity = NAN;
	rc = spec_forward(m, &c, r, progress);
	if (!rc && api->seq_stats(c.seq, &st) == KVP_OK)
		ab_result_bytes(r, &st, (uint64_t)m->n);
	if (!rc && heads) {
		kvp_shape shape = llama_model_shape(&m->model.config);
		if (ab_heads_read(api, c.seq, &shape, &r->heads))
			rc = 1;
	}
	llama_plugin_cache_close(&c);
	return rc;
}

static void model_free(struct model_run *m)
{
	free(m->tokens);
	free(m->log_probs);
	free(m->attention);
	free(m->observed);
	free(m->kl);
	llama_state_free(&m->state);
	llama_tokenizer_free(&m->tokenizer);
	llama_model_free(&m->model);
}

/* ---- the runs ---- */

struct run {
	struct options opt;
	void *library;
	const kvp_plugin_v1 *api;
	struct ab_result results[MAX_SPECS];
	char title[CLI_PATH_CAP + 512];
};

/* --csv, --plot and --report of the results */
static int write_files(struct run *r)
{
	char message[AB_MESSAGE_MAX];

	if (r->opt.csv && ab_write_csv(r->opt.csv, r->results, r->opt.n_specs, message))
		return cli_bad_input("%s", message);
	if (r->opt.plot && ab_write_svg(r->opt.plot, r->title, r->results, r->opt.n_specs, message))
		return cli_bad_input("%s", message);
	if (r->opt.report && ab_write_html(r->opt.report, r->title, r->results, r->opt.n_specs, message))
		return cli_bad_input("%s", message);
	return 0;
}

static int report(struct run *r)
{
	ab_print_table(stdout, r->title, r->results, r->opt.n_specs);
	if (r->opt.heads)
		ab_heads_print(stdout, r->results, r->opt.n_specs);
	fflush(stdout);
	return write_files(r);
}

static int run_model(struct run *r)
{
	static struct model_run m;
	struct ab_progress progress;
	kvp_shape shape;
	int rc, i;

	rc = model_load(&m, &r->opt);
	if (!rc) {
		shape = llama_model_shape(&m.model.config);
		rc = check_specs(&r->opt, r->api, &shape, (uint64_t)m.n);
	}
	if (rc) {
		model_free(&m);
		return rc;
	}
	if (m.n > m.n_prompt)
		snprintf(r->title, sizeof(r->title), "kvpager-ab: %s, %d positions (prompt %d, then greedy with the "
			 "full cache), every spec teacher-forced", r->opt.model, m.n, m.n_prompt);
	else
		snprintf(r->title, sizeof(r->title), "kvpager-ab: %s, %d positions of the prompt, every spec "
			 "teacher-forced", r->opt.model, m.n);
	ab_progress_start(&progress, (uint64_t)m.n * (uint64_t)(1 + r->opt.n_specs), !r->opt.quiet);
	rc = model_reference(&m, &progress);
	for (i = 0; i < r->opt.n_specs && !rc; i++) {
		spec_progress(&progress, &r->opt, i);
		rc = model_spec(&m, r->api, r->opt.pool, r->opt.specs[i], r->opt.heads, &r->results[i], &progress);
	}
	ab_progress_end(&progress);
	model_free(&m);
	return rc ? rc : report(r);
}

/* ---- the text source: perplexity ---- */

struct text_run {
	struct llama_model model;
	struct llama_tokenizer tokenizer;
	struct ab_text text;
	struct ab_text_model scorer;
	struct ab_text_score full, specs[MAX_SPECS];
	struct ab_heads heads[MAX_SPECS]; /* --heads: each spec's at the end of the last chunk */
	struct ab_progress progress;
	char label[AB_PROGRESS_LABEL_MAX + 32];
};

/* The model, the tokenized text and the scorers; 0, 2 for bad input, 1 otherwise. */
static int text_load(struct text_run *t, const struct options *o, const kvp_plugin_v1 *api)
{
	char message[AB_MESSAGE_MAX];
	kvp_shape shape;
	int rc, i, seq_len, n_ctx;

	rc = checkpoint_load(&t->model, &t->tokenizer, o);
	if (rc)
		return rc;
	seq_len = t->model.config.seq_len;
	if (o->ctx > seq_len)
		return cli_bad_input("--ctx %ld is above the context of %s (%d tokens)", o->ctx, o->model, seq_len);
	n_ctx = o->ctx ? (int)o->ctx : seq_len;
	if (n_ctx < 3)
		return cli_bad_input("%s has a context of %d tokens: too short to score a chunk", o->model, seq_len);
	rc = ab_text_open(&t->text, &t->tokenizer, o->text, n_ctx, (int)o->chunks, message);
	if (rc) {
		fprintf(stderr, "kvpager-ab: %s\n", message);
		return rc;
	}
	shape = llama_model_shape(&t->model.config);
	rc = check_specs(o, api, &shape, (uint64_t)n_ctx);
	if (rc)
		return rc;
	rc = ab_text_model_open(&t->scorer, &t->model, &t->text) || ab_text_score_open(&t->full, &t->text);
	for (i = 0; i < o->n_specs && !rc; i++)
		rc = ab_text_score_open(&t->specs[i], &t->text);
	if (rc)
		fputs("kvpager-ab: no memory for the perplexity run\n", stderr);
	return rc;
}

static void text_free(struct text_run *t, int n_specs)
{
	int i;

	for (i = 0; i < n_specs; i++) {
		ab_text_score_close(&t->specs[i]);
		ab_heads_free(&t->heads[i]);
	}
	ab_text_score_close(&t->full);
	ab_text_model_close(&t->scorer);
	ab_text_close(&t->text);
	llama_tokenizer_free(&t->tokenizer);
	llama_model_free(&t->model);
}

/* "spec 2 of 5 S2 <what sets it apart>, chunk 3 of 8", or "full cache, chunk 3 of 8" */
static const char *text_label(struct text_run *t, const struct options *o, int chunk, int spec)
{
	char which[AB_PROGRESS_LABEL_MAX];

	if (spec)
		ab_progress_spec_label(which, sizeof(which), o->specs, o->n_specs, spec - 1);
	snprintf(t->label, sizeof(t->label), "%s, chunk %d of %d", spec ? which : "full cache", chunk + 1,
		 t->text.n_chunks);
	return t->label;
}

/* The full cache on one chunk: its log-probabilities become the reference of the specs. */
static int text_reference(struct text_run *t, struct llama_dense_cache *dense, int chunk, const struct options *o)
{
	struct llama_attention att = llama_dense_attention(dense);
	int rc = ab_text_run_chunk(&t->scorer, &t->text, chunk, &att, 1, &t->full, &t->progress,
				   text_label(t, o, chunk, 0));

	if (rc)
		fprintf(stderr, "kvpager-ab: the full cache failed on chunk %d (%d)\n", chunk + 1, rc);
	return rc ? 1 : 0;
}

/* One spec on one chunk, in a sequence of its own, like a fresh context in llama-perplexity. */
static int text_spec(struct text_run *t, const kvp_plugin_v1 *api, const struct options *o, int chunk, int index)
{
	const char *spec = o->specs[index];
	struct llama_plugin_cache c;
	struct ab_bytes_meter meter = { 0 };
	struct metered_attention metered;
	struct llama_attention att = { &metered, metered_append, metered_attend, metered_step };
	kvp_stats st = { .size = sizeof(st) };
	int rc = llama_plugin_cache_open(&c, api, &t->model.config, o->pool, spec);

	if (rc) {
		fprintf(stderr, "kvpager-ab: spec '%s': %s\n", spec, c.message);
		return rc == LLAMA_EINPUT ? CLI_EXIT_BAD_INPUT : 1;
	}
	metered = (struct metered_attention){ llama_plugin_attention(&c), &c, &meter };
	rc = ab_text_run_chunk(&t->scorer, &t->text, chunk, &att, 0, &t->specs[index], &t->progress,
			       text_label(t, o, chunk, index + 1));
	if (rc) {
		fprintf(stderr, "kvpager-ab: spec '%s': chunk %d: %s\n", spec, chunk + 1,
			rc == LLAMA_EATTENTION ? c.message : "the forward pass failed");
		rc = rc == LLAMA_EATTENTION && (c.status == KVP_EINVAL || c.status == KVP_EUNSUPPORTED)
			     ? CLI_EXIT_BAD_INPUT : 1;
	} else if (api->seq_stats(c.seq, &st) == KVP_OK) {
		ab_text_add_stats(&t->specs[index], &st, &meter);
	}
	if (!rc && o->heads && chunk == t->text.n_chunks - 1) {
		kvp_shape shape = llama_model_shape(&t->model.config);
		rc = ab_heads_read(api, c.seq, &shape, &t->heads[index]) ? 1 : 0;
	}
	llama_plugin_cache_close(&c);
	return rc;
}

/* Chunk by chunk, the full cache then every spec: memory stays at one chunk's distributions. */
static int text_chunks(struct text_run *t, struct run *r)
{
	struct llama_dense_cache dense;
	int chunk, i, rc = 0, n = r->opt.n_specs;

	if (llama_dense_cache_init(&dense, &t->model.config)) {
		fputs("kvpager-ab: no memory for the full cache\n", stderr);
		return 1;
	}
	ab_progress_start(&t->progress, (uint64_t)t->text.n_chunks * (uint64_t)t->text.n_ctx * (uint64_t)(1 + n),
			  !r->opt.quiet);
	for (chunk = 0; chunk < t->text.n_chunks && !rc; chunk++) {
		rc = text_reference(t, &dense, chunk, &r->opt);
		for (i = 0; i < n && !rc; i++)
			rc = text_spec(t, r->api, &r->opt, chunk, i);
	}
	ab_progress_end(&t->progress);
	llama_dense_cache_free(&dense);
	return rc;
}

static int text_report(struct text_run *t, struct run *r)
{
	struct ab_result full;
	int i, n_ctx = t->text.n_ctx;

	memset(&full, 0, sizeof(full));
	ab_text_result(&t->full, &t->text, &full);
	for (i = 0; i < r->opt.n_specs; i++) {
		memset(&r->results[i], 0, sizeof(r->results[i]));
		r->results[i].spec = r->opt.specs[i];
		r->results[i].heads = t->heads[i]; /* the result owns it from here */
		memset(&t->heads[i], 0, sizeof(t->heads[i]));
		ab_text_result(&t->specs[i], &t->text, &r->results[i]);
	}
	snprintf(r->title, sizeof(r->title), "kvpager-ab: %s on %s: %d tokens, %d chunks of %d (BOS first), "
		 "%d predictions scored per chunk (positions %d..%d, as llama-perplexity); KL and top-1 against "
		 "the full cache there; bytes/tok the mean over every position", r->opt.model, r->opt.text, t->text.n_tokens,
		 t->text.n_chunks, n_ctx, ab_text_scored_per_chunk(&t->text), ab_text_first_scored(&t->text),
		 n_ctx - 2);
	ab_print_text_table(stdout, r->title, full.perplexity, r->results, r->opt.n_specs);
	if (r->opt.heads)
		ab_heads_print(stdout, r->results, r->opt.n_specs);
	fflush(stdout);
	return write_files(r);
}

static int run_text(struct run *r)
{
	static struct text_run t;
	int rc = text_load(&t, &r->opt, r->api);

	if (!rc)
		rc = text_chunks(&t, r);
	if (!rc)
		rc = text_report(&t, r);
	text_free(&t, r->opt.n_specs);
	return rc;
}

/* ---- --prefix-share ---- */

/* The source tokens of the prompts: --text FILE or --prompt TEXT, BOS first; their count, or -2 for a
 * text file that cannot serve (message says why), -1 without memory. */
static int prefix_source(const struct options *o, const struct llama_tokenizer *tok, int **out, char *message)
{
	struct ab_text text;
	int rc, n;

	if (o->text) {
		rc = ab_text_open(&text, tok, o->text, o->ctx ? (int)o->ctx : 256, 1, message);
		*out = text.tokens;
		return rc ? -rc : text.n_tokens;
	}
	if (!(*out = malloc(sizeof(int) * (strlen(o->prompt) + 3))))
		return -1;
	n = llama_encode(tok, o->prompt, 1, 0, *out);
	return n < 0 ? -1 : n;
}

/* The prompts made from source, run, printed: 0 when every prompt's greedy tokens equal the run without
 * the cache, 1 when one does not (or on a failure), 2 for bad input. */
static int prefix_runs(struct run *r, const struct llama_model *model, struct ab_prefix_run *p, const int *source,
		       int n_source)
{
	char message[AB_MESSAGE_MAX];
	int *prompts, rc;

	p->length = r->opt.text ? (r->opt.ctx ? (int)r->opt.ctx : 256) : n_source;
	if (p->length + p->steps - 1 > model->config.seq_len)
		return cli_bad_input("prompts of %d tokens and %d greedy tokens pass %s's context of %d", p->length,
				     p->steps, r->opt.model, model->config.seq_len);
	if (!(prompts = malloc(sizeof(int) * (size_t)p->count * (size_t)p->length)))
		return 1;
	p->shared = ab_prefix_prompts(source, n_source, p->length, p->count, model->config.vocab_size, prompts);
	if (p->shared < 0) {
		free(prompts);
		return cli_bad_input("cannot make %d different prompts of %d tokens from %d tokens", p->count,
				     p->length, n_source);
	}
	rc = ab_prefix_share(r->api, model, p, prompts, message);
	free(prompts);
	if (rc) {
		fprintf(stderr, "kvpager-ab: %s\n", message);
		return rc;
	}
	ab_prefix_print(stdout, p);
	fflush(stdout);
	return ab_prefix_all_equal(p) ? 0 : 1;
}

static int run_prefix(struct run *r)
{
	static struct llama_model model;
	static struct llama_tokenizer tok;
	struct ab_prefix_run p;
	char message[AB_MESSAGE_MAX];
	int *source = NULL, n_source, rc = checkpoint_load(&model, &tok, &r->opt);

	memset(&p, 0, sizeof(p));
	p.model_path = r->opt.model;
	p.pool = r->opt.pool;
	p.spec = r->opt.specs[0];
	p.count = r->opt.prompts ? (int)r->opt.prompts : 8;
	p.steps = r->opt.steps ? (int)r->opt.steps : 16;
	if (!rc) {
		n_source = prefix_source(&r->opt, &tok, &source, message);
		if (n_source == -2)
			rc = cli_bad_input("%s", message);
		else if (n_source < 0)
			rc = 1, fputs("kvpager-ab: no memory for the prompts\n", stderr);
		else
			rc = prefix_runs(r, &model, &p, source, n_source);
	}
	free(source);
	ab_prefix_free(&p);
	llama_tokenizer_free(&tok);
	llama_model_free(&model);
	return rc;
}

/* ---- trace and synthetic sources ---- */

static int trace_step(void *ctx, int32_t *pos, float *q, float *k, float *v)
{
	return trace_read_step(ctx, pos, q, k, v);
}

static int trace_rewind(void *ctx)
{
	return trace_reader_rewind(ctx);
}

static const char *trace_error(void *ctx)
{
	return ((struct trace_reader *)ctx)->error;
}

static int synthetic_step(void *ctx, int32_t *pos, float *q, float *k, float *v)
{
	return synthetic_read_step(ctx, pos, q, k, v);
}

static int synthetic_restart(void *ctx)
{
	synthetic_rewind(ctx);
	return 0;
}

static const char *synthetic_error(void *ctx)
{
	(void)ctx;
	return "the synthetic trace failed";
}

static int replay(struct run *r, const struct ab_source *src)
{
	struct ab_reference ref;
	struct ab_progress progress;
	char message[AB_MESSAGE_MAX];
	int rc, i;

	rc = check_specs(&r->opt, r->api, &src->shape, src->n_steps);
	if (rc)
		return rc;
	ab_progress_start(&progress, src->n_steps * (uint64_t)(1 + r->opt.n_specs), !r->opt.quiet);
	rc = ab_replay_reference(src, (uint32_t)r->opt.every, &ref, &progress, message);
	if (rc)
		fprintf(stderr, "kvpager-ab: %s\n", message);
	for (i = 0; i < r->opt.n_specs && !rc; i++) {
		spec_progress(&progress, &r->opt, i);
		rc = ab_replay_spec(r->api, r->opt.pool, src, &ref, r->opt.specs[i], r->opt.heads, &r->results[i], &progress,
				    message);
		r->results[i].perplexity = NAN;
		if (rc)
			fprintf(stderr, "kvpager-ab: spec '%s': %s\n", r->opt.specs[i], message);
	}
	ab_progress_end(&progress);
	ab_reference_free(&ref);
	return rc ? rc : report(r);
}

static void describe_replay(struct run *r, const char *what, const kvp_shape *s, uint64_t steps)
{
	snprintf(r->title, sizeof(r->title), "kvpager-ab: %s: %llu tokens, %u layers, %u query heads, %u KV "
		 "heads, head_dim %u; attention compared every %ld steps", what, (unsigned long long)steps,
		 s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim, r->opt.every);
}

static int run_trace(struct run *r)
{
	struct trace_reader reader;
	struct ab_source src;
	char what[CLI_PATH_CAP + 16];
	int rc;

	if (trace_reader_open(&reader, r->opt.trace)) {
		rc = cli_bad_input("%s", reader.error);
		trace_reader_close(&reader);
		return rc;
	}
	src = (struct ab_source){ &reader, reader.shape, reader.n_steps, trace_step, trace_rewind, trace_error };
	snprintf(what, sizeof(what), "trace %s", r->opt.trace);
	describe_replay(r, what, &src.shape, src.n_steps);
	rc = replay(r, &src);
	trace_reader_close(&reader);
	return rc;
}

static int run_synthetic(struct run *r)
{
	struct synthetic_trace trace;
	struct ab_source src;
	int rc;

	if (synthetic_open(&trace, (uint64_t)r->opt.tokens, r->opt.seed)) {
		fputs("kvpager-ab: no memory for the synthetic trace\n", stderr);
		return 1;
	}
	src = (struct ab_source){ &trace, trace.shape, trace.n_steps, synthetic_step, synthetic_restart,
				  synthetic_error };
	describe_replay(r, "synthetic trace", &src.shape, src.n_steps);
	rc = replay(r, &src);
	synthetic_close(&trace);
	return rc;
}

int main(int argc, char **argv)
{
	static struct run r;
	int rc;

	cli_program = "kvpager-ab";
	r.opt.pool = "";
	rc = parse_options(&r.opt, argc, argv);
	if (!r.opt.prompt)
		r.opt.prompt = "";
	if (!r.opt.steps && !r.opt.prefix_share)
		r.opt.steps = 256;
	if (!rc)
		rc = default_paths(&r.opt, argv[0]);
	if (!rc) {
		if (!r.opt.every)
			r.opt.every = r.opt.model || r.opt.trace ? 1 : SYNTHETIC_EVERY;
		if (!r.opt.tokens)
			r.opt.tokens = SYNTHETIC_TOKENS;
		if (!r.opt.seeded)
			r.opt.seed = 1;
		r.api = cli_plugin_load(r.opt.plugin, &r.library);
		rc = r.api ? 0 : CLI_EXIT_BAD_INPUT; /* a --plugin path that does not serve the table */
	}
	if (!rc)
		rc = r.opt.prefix_share ? run_prefix(&r) : r.opt.text ? run_text(&r) : r.opt.model ? run_model(&r) : r.opt.trace ? run_trace(&r)
									       : run_synthetic(&r);
	for (int i = 0; i < r.opt.n_specs; i++)
		ab_heads_free(&r.results[i].heads);
	if (r.library)
		dlclose(r.library);
	return rc;
}
