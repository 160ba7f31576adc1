/*
 * kvpager-llama — text generation with a llama2.c checkpoint whose every attention call goes through the
 * kvpager plugin (dlopen + the kvp_plugin_v1 table), or through an exact in-process cache (--dense).
 *
 *   kvpager-llama [--model PATH] [--tokenizer PATH] [--prompt TEXT] [--steps N] [--temp T] [--seed N]
 *                 [--plugin PATH] [--pool SPEC] [--cache SPEC] [--dense]
 *                 [--print-logits N] [--print-ids] [--quiet] [--record FILE]
 *
 * Defaults: the model is $KVP_MODELS/stories260K.bin, or ../shared/models/stories260K.bin when KVP_MODELS
 * is not set; the tokenizer is tok512.bin in the model's directory; the plugin is libkvpager.so.1 in the
 * directory of this executable. --record FILE writes every layer's post-RoPE query, key and value of
 * every position as an attention trace (include/kvpager_trace.h) for kvpager-ab --trace. Exit status: 0 done, 2 bad input (options, checkpoint, tokenizer, specs
 * the library rejects), 1 any other failure.
 */
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvpager.h"
#include "tools/cli.h"
#include "tools/llama.h"
#include "tools/trace.h"


struct options {
	const char *model, *tokenizer, *prompt, *plugin, *pool, *cache, *record;
	char model_buf[CLI_PATH_CAP], tokenizer_buf[CLI_PATH_CAP], plugin_buf[CLI_PATH_CAP];
	long steps, print_logits;
	unsigned long long seed;
	float temp;
	int dense, print_ids, quiet, seeded;
};

/* What --record keeps of a layer until its value arrives: the record is written then. */
struct recorder {
	struct trace_writer writer;
	float *q, *k;
	int failed;
};

/* Everything one run holds, so one function can release it on every path. */
struct run {
	struct options opt;
	struct llama_model model;
	struct llama_tokenizer tokenizer;
	struct llama_state state;
	struct llama_dense_cache dense;
	struct llama_plugin_cache plugin;
	struct llama_attention attention;
	void *library;
	int *prompt_ids;
	int n_prompt;
	struct recorder recorder;
	struct llama_observer observer;
};

static void usage(FILE *f)
{
	fputs("usage: kvpager-llama [options]\n"
	      "  --model PATH        llama2.c checkpoint (default $KVP_MODELS/stories260K.bin,\n"
	      "                      or ../shared/models/stories260K.bin)\n"
	      "  --tokenizer PATH    tokenizer (default tok512.bin next to the model)\n"
	      "  --prompt TEXT       text to continue (default: none, start from BOS)\n"
	      "  --steps N           positions to run, prompt included (default 256, at most seq_len)\n"
	      "  --temp T            sampling temperature; 0 is greedy argmax (default 0)\n"
	      "  --seed N            random seed for --temp > 0 (default: the time)\n"
	      "  --plugin PATH       kvpager plugin (default libkvpager.so.1 next to this program,\n"
	      "                      else the installed one)\n"
	      "  --pool SPEC         pool specification (default \"\")\n"
	      "  --cache SPEC        tenant specification: the cache configuration (default \"\")\n"
	      "  --dense             use the exact in-process cache instead of the plugin\n"
	      "  --print-logits N    print the first N logits of position 0 on one line first\n"
	      "  --print-ids         print the generated ids on one line instead of the text\n"
	      "  --quiet             no speed and cache report on stderr\n"
	      "  --record FILE       write the post-RoPE queries, keys and values of every layer and\n"
	      "                      position as a trace for kvpager-ab --trace (include/kvpager_trace.h)\n", f);
}

static int parse_temp(const char *s, float *out)
{
	char *end;
	float v;

	errno = 0;
	v = strtof(s, &end);
	if (errno || end == s || *end || !(v >= 0.0f && v <= 1000.0f))
		return -1;
	*out = v;
	return 0;
}

static int parse_seed(const char *s, unsigned long long *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 10);
	return errno || end == s || *end || s[0] == '-' ? -1 : 0;
}

/* Options that take a value; returns 0, or an exit status. */
static int parse_valued(struct options *o, const char *name, const char *val)
{
	if (!strcmp(name, "--model"))
		o->model = val;
	else if (!strcmp(name, "--tokenizer"))
		o->tokenizer = val;
	else if (!strcmp(name, "--prompt"))
		o->prompt = val;
	else if (!strcmp(name, "--plugin"))
		o->plugin = val;
	else if (!strcmp(name, "--pool"))
		o->pool = val;
	else if (!strcmp(name, "--cache"))
		o->cache = val;
	else if (!strcmp(name, "--record"))
		o->record = val;
	else if (!strcmp(name, "--steps") && cli_parse_long(val, 1, INT_MAX, &o->steps))
		return cli_bad_input("--steps wants a positive integer, not '%s'", val);
	else if (!strcmp(name, "--print-logits") && cli_parse_long(val, 0, INT_MAX, &o->print_logits))
		return cli_bad_input("--print-logits wants a count, not '%s'", val);
	else if (!strcmp(name, "--temp") && parse_temp(val, &o->temp))
		return cli_bad_input("--temp wants a number in [0, 1000], not '%s'", val);
	else if (!strcmp(name, "--seed")) {
		if (parse_seed(val, &o->seed))
			return cli_bad_input("--seed wants a non-negative integer, not '%s'", val);
		o->seeded = 1;
	}
	return 0;
}

static int takes_value(const char *name)
{
	static const char *const valued[] = { "--model", "--tokenizer", "--prompt", "--plugin", "--pool",
					      "--cache", "--steps", "--print-logits", "--temp", "--seed", "--record" };
	size_t i;

	for (i = 0; i < sizeof(valued) / sizeof(valued[0]); i++)
		if (!strcmp(name, valued[i]))
			return 1;
	return 0;
}

static int parse_options(struct options *o, int argc, char **argv)
{
	int i, rc;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--dense"))
			o->dense = 1;
		else if (!strcmp(a, "--print-ids"))
			o->print_ids = 1;
		else if (!strcmp(a, "--quiet"))
			o->quiet = 1;
		else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			exit(0);
		} else if (takes_value(a)) {
			if (i + 1 >= argc)
				return cli_bad_input("%s needs a value", a);
			rc = parse_valued(o, a, argv[++i]);
			if (rc)
				return rc;
		} else {
			usage(stderr);
			return cli_bad_input("unknown option '%s'", a);
		}
	}
	return 0;
}

/* dir of path, with the trailing '/', into buf; "" when path has no directory part */
static int default_paths(struct options *o, const char *argv0)
{
	const char *models = getenv("KVP_MODELS");
	const char *models_dir = models && models[0] ? models : "../shared/models";

	if (!o->model) {
		if (snprintf(o->model_buf, CLI_PATH_CAP, "%s/stories260K.bin", models_dir) >= CLI_PATH_CAP)
			return cli_bad_input("KVP_MODELS is too long");
		o->model = o->model_buf;
	}
	if (!o->tokenizer) {
		if (cli_beside(o->model, "tok512.bin", o->tokenizer_buf))
			return cli_bad_input("model path too long: %s", o->model);
		o->tokenizer = o->tokenizer_buf;
	}
	if (!o->plugin) {
		if (cli_default_plugin(argv0, o->plugin_buf))
			return cli_bad_input("executable path too long: %s", argv0);
		o->plugin = o->plugin_buf;
	}
	return 0;
}

static int open_attention(struct run *r)
{
	const kvp_plugin_v1 *api;
	int rc;

	if (r->opt.dense) {
		if (llama_dense_cache_init(&r->dense, &r->model.config)) {
			fputs("kvpager-llama: no memory for the dense cache\n", stderr);
			return 1;
		}
		r->attention = llama_dense_attention(&r->dense);
		return 0;
	}
	api = cli_plugin_load(r->opt.plugin, &r->library);
	if (!api)
		return 1;
	rc = llama_plugin_cache_open(&r->plugin, api, &r->model.config, r->opt.pool, r->opt.cache);
	if (rc) {
		fprintf(stderr, "kvpager-llama: %s\n", r->plugin.message);
		return rc == LLAMA_EINPUT ? CLI_EXIT_BAD_INPUT : 1;
	}
	r->attention = llama_plugin_attention(&r->plugin);
	return 0;
}

static int load_inputs(struct run *r)
{
	char err[LLAMA_ERROR_MAX];
	int rc;

	rc = llama_model_load(&r->model, r->opt.model, err);
	if (!rc)
		rc = llama_tokenizer_load(&r->tokenizer, r->opt.tokenizer, r->model.config.vocab_size, err);
	if (rc) {
		fprintf(stderr, "kvpager-llama: %s\n", err);
		return rc == LLAMA_EINPUT ? CLI_EXIT_BAD_INPUT : 1;
	}
	if (llama_state_init(&r->state, &r->model.config)) {
		fputs("kvpager-llama: no memory for the activations\n", stderr);
		return 1;
	}
	r->prompt_ids = malloc(sizeof(int) * (strlen(r->opt.prompt) + 3));
	if (!r->prompt_ids)
		return 1;
	r->n_prompt = llama_encode(&r->tokenizer, r->opt.prompt, 1, 0, r->prompt_ids);
	return r->n_prompt < 0 ? 1 : 0;
}

/* Writes a piece, skipping lone control bytes as run.c does: byte tokens can be anything. */
static void print_piece(const char *p, size_t len)
{
	unsigned char b = (unsigned char)p[0];

	if (len == 1 && !isprint(b) && !isspace(b))
		return;
	fwrite(p, 1, len, stdout);
}

static void print_logits(const struct run *r)
{
	long i, n = r->opt.print_logits;

	if (n > r->model.config.vocab_size)
		n = r->model.config.vocab_size;
	for (i = 0; i < n; i++)
		printf("%s%.5f", i ? " " : "", r->state.logits[i]);
	printf("\n");
}

static int next_token(struct run *r, int pos, uint64_t *rng)
{
	if (pos + 1 < r->n_prompt)
		return r->prompt_ids[pos + 1];
	if (r->opt.temp == 0.0f)
		return llama_argmax(r->state.logits, r->model.config.vocab_size);
	return llama_sample(r->state.logits, r->model.config.vocab_size, r->opt.temp, rng);
}

static int forward_failed(struct run *r, int rc, int pos)
{
	if (rc == LLAMA_EATTENTION && !r->opt.dense)
		fprintf(stderr, "kvpager-llama: position %d: %s\n", pos, r->plugin.message);
	else
		fprintf(stderr, "kvpager-llama: position %d: the forward pass failed (%d)\n", pos, rc);
	return 1;
}

/* The decode loop of run.c: the prompt is forced, then tokens are chosen until steps or BOS. */
static int generate(struct run *r, long *positions)
{
	uint64_t rng = r->opt.seeded ? r->opt.seed : (uint64_t)time(NULL);
	int pos, token = r->prompt_ids[0], next, rc, printed = 0;
	size_t len;
	const char *piece;

	if (!rng)
		rng = 0x9E3779B97F4A7C15ULL; /* xorshift stays at 0 forever */
	for (pos = 0; pos < r->opt.steps; pos++) {
		rc = llama_forward(&r->model, &r->state, &r->attention, r->opt.record ? &r->observer : NULL,
				   token, pos);
		if (rc)
			return forward_failed(r, rc, pos);
		if (r->recorder.failed) {
			fprintf(stderr, "kvpager-llama: %s\n", r->recorder.writer.error);
			return 1;
		}
		*positions = pos + 1;
		if (pos == 0 && r->opt.print_logits)
			print_logits(r);
		next = next_token(r, pos, &rng);
		if (next == LLAMA_TOKEN_BOS)
			break;
		if (r->opt.print_ids && pos + 1 >= r->n_prompt) {
			printf("%s%d", printed++ ? " " : "", next);
		} else if (!r->opt.print_ids) {
			piece = llama_decode(&r->tokenizer, token, next, &len);
			print_piece(piece, len);
		}
		fflush(stdout);
		token = next;
	}
	printf("\n");
	return 0;
}

static void report(const struct run *r, long positions, double seconds)
{
	kvp_stats st = { .size = sizeof(st) };

	fprintf(stderr, "kvpager-llama: %ld positions in %.3f s: %.1f tok/s (%s)\n", positions, seconds,
		seconds > 0 ? (double)positions / seconds : 0.0, r->opt.dense ? "dense" : r->opt.plugin);
	if (r->opt.dense || r->plugin.api->seq_stats(r->plugin.seq, &st))
		return;
	fprintf(stderr, "kvpager-llama: cache: %llu appended, %llu retained; bytes: %llu exact, "
		"%llu compressed, %llu meta, %llu spilled, %llu as dense fp16\n",
		(unsigned long long)st.tokens_appended, (unsigned long long)st.tokens_retained,
		(unsigned long long)st.bytes_exact, (unsigned long long)st.bytes_compressed,
		(unsigned long long)st.bytes_meta, (unsigned long long)st.bytes_spilled,
		(unsigned long long)st.bytes_dense_fp16);
}

static double now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void record_tap(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct recorder *rec = ctx;

	if (tap == LLAMA_TAP_Q)
		memcpy(rec->q, x, sizeof(float) * (size_t)n);
	else if (tap == LLAMA_TAP_K)
		memcpy(rec->k, x, sizeof(float) * (size_t)n);
	else if (tap == LLAMA_TAP_V && !rec->failed)
		rec->failed = trace_write(&rec->writer, (uint32_t)layer, pos, rec->q, rec->k, x) != 0;
}

static int open_recorder(struct run *r)
{
	kvp_shape shape = llama_model_shape(&r->model.config);
	struct recorder *rec = &r->recorder;

	if (!r->opt.record)
		return 0;
	rec->q = malloc(sizeof(float) * (size_t)r->model.config.dim);
	rec->k = malloc(sizeof(float) * (size_t)r->model.config.kv_dim);
	if (!rec->q || !rec->k)
		return 1;
	if (trace_writer_open(&rec->writer, r->opt.record, &shape))
		return cli_bad_input("%s", rec->writer.error);
	r->observer = (struct llama_observer){ rec, record_tap };
	return 0;
}

static int close_recorder(struct run *r)
{
	struct recorder *rec = &r->recorder;
	int rc = trace_writer_close(&rec->writer);

	free(rec->q);
	free(rec->k);
	rec->q = rec->k = NULL;
	if (rc)
		fprintf(stderr, "kvpager-llama: %s: %s\n", r->opt.record, rec->writer.error);
	return rc ? 1 : 0;
}

static int run(struct run *r)
{
	long positions = 0;
	double t0;
	int rc;

	rc = load_inputs(r);
	if (rc)
		return rc;
	if (r->opt.steps > r->model.config.seq_len)
		r->opt.steps = r->model.config.seq_len;
	rc = open_attention(r);
	if (!rc)
		rc = open_recorder(r);
	if (rc)
		return rc;
	t0 = now_seconds();
	rc = generate(r, &positions);
	if (!rc && r->opt.record)
		rc = close_recorder(r);
	if (!rc && !r->opt.quiet)
		report(r, positions, now_seconds() - t0);
	return rc;
}

static void release(struct run *r)
{
	close_recorder(r);
	llama_plugin_cache_close(&r->plugin);
	if (r->library)
		dlclose(r->library);
	llama_dense_cache_free(&r->dense);
	free(r->prompt_ids);
	llama_state_free(&r->state);
	llama_tokenizer_free(&r->tokenizer);
	llama_model_free(&r->model);
}

int main(int argc, char **argv)
{
	static struct run r;
	int rc;

	cli_program = "kvpager-llama";
	r.opt.steps = 256;
	r.opt.prompt = "";
	r.opt.pool = "";
	r.opt.cache = "";
	rc = parse_options(&r.opt, argc, argv);
	if (!rc)
		rc = default_paths(&r.opt, argv[0]);
	if (!rc)
		rc = run(&r);
	release(&r);
	return rc;
}
