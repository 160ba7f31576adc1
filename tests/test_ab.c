/*
 * Suite ab: kvpager-ab end to end — a real model (kjv-64) with the exact cache and a TurboQuant cold
 * tier, a trace recorded by kvpager-llama and replayed, the built-in synthetic trace, the CSV and the
 * SVG, and bad inputs (truncated traces and checkpoints, a wrong magic, unknown options and spec keys,
 * a policy spec the library may not serve yet), and --text: perplexity over kjv-heldout.txt against the
 * rule of llama.cpp's llama-perplexity computed here with the dense cache, and its bad inputs. Then the
 * plot's geometry (log axes, width, labels, the best trade-off curve), the HTML report's escaping, and the
 * report in headless chromium (skipped, saying so, where chromium is not installed; CI installs it).
 * Last, --prefix-share: prompts sharing a prefix through the prefix cache, its hit rate and saved prefill
 * tokens, and greedy tokens equal to a run without the cache.
 *
 * Models come from $KVP_MODELS (default ../shared/models); the tools from $KVP_TEST_BUILD (default build).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvpager_trace.h"
#include "tools/ab.h"
#include "tool_fixture.h"
#include "tools/llama.h"

#define TQ3 "k=turboquant(bits=3),v=turboquant(bits=3)"

/* COL_BYTES_PER_TOKEN and COL_COMPRESSION are the run's mean; the raw bytes are the final snapshot's */
enum column {
	COL_SPEC, COL_TOKENS, COL_BYTES_PER_TOKEN, COL_COMPRESSION, COL_KL_MEAN, COL_KL_P99, COL_TOP1,
	COL_ATTENTION_ERROR, COL_ATTENTION_ERROR_MAX, COL_TOKENS_PER_S, COL_BYTES_EXACT, COL_BYTES_COMPRESSED,
	COL_BYTES_META, COL_BYTES_DENSE_FP16, COL_BYTES_PER_TOKEN_PEAK, COL_BYTES_PER_TOKEN_FINAL,
	COL_COMPRESSION_FINAL, COL_BYTES_PEAK, COL_BYTES_COMPRESSED_PEAK, COL_COLD_TIER, COL_COLD_TIER_USED,
	COL_PERPLEXITY, COL_META_PER_TOKEN_STREAM, COL_META_SEQUENCE, N_COLUMNS
};

struct row {
	char spec[256];
	double value[N_COLUMNS]; /* NAN for an empty field */
};

/* A fresh temporary path (the file is created empty). */
static const char *temp_path(char *buf, size_t cap, const char *suffix)
{
	int fd;

	snprintf(buf, cap, "/tmp/kvp_test_ab_XXXXXX%s", suffix);
	fd = mkstemps(buf, (int)strlen(suffix));
	cr_assert_geq(fd, 0);
	close(fd);
	return buf;
}

/* Runs a tool quietly with args; stderr (merged after stdout) lands in out. Returns the exit status. */
static int run(const char *tool, const char *args, char *out, size_t cap)
{
	char quiet[8192];

	snprintf(quiet, sizeof quiet, "--quiet %s", args);
	return run_tool(tool, quiet, 1, out, cap);
}

/* The spec field: quoted, with "" for a quote. Returns the rest of the line after the comma. */
static const char *parse_spec(const char *s, char *spec, size_t cap)
{
	size_t n = 0;

	cr_assert_eq(*s, '"', "the spec field is quoted: %s", s);
	for (s++; *s && !(s[0] == '"' && s[1] != '"'); s++) {
		if (s[0] == '"')
			s++;
		cr_assert_lt(n + 1, cap);
		spec[n++] = *s;
	}
	spec[n] = '\0';
	cr_assert_eq(s[0], '"');
	cr_assert_eq(s[1], ',');
	return s + 2;
}

static void parse_row(const char *line, struct row *r)
{
	const char *s = parse_spec(line, r->spec, sizeof(r->spec));
	char *end;
	int c;

	for (c = COL_TOKENS; c < N_COLUMNS; c++) {
		if (*s == ',' || *s == '\n' || !*s) {
			r->value[c] = NAN;
			end = (char *)s;
		} else {
			r->value[c] = strtod(s, &end);
			cr_assert_neq(end, s, "column %d of '%s'", c, line);
		}
		s = end;
		if (c + 1 < N_COLUMNS) {
			cr_assert_eq(*s, ',', "column %d of '%s' ends with '%c'", c, line, *s);
			s++;
		}
	}
}

/* Reads the CSV: checks the header, returns the number of rows. */
static int read_csv(const char *path, struct row *rows, int cap)
{
	static const char header[] = "spec,tokens,bytes_per_token_mean,compression_vs_fp16_mean,kl_mean,kl_p99,"
				     "top1_agreement,attention_rel_error,attention_rel_error_max,tokens_per_s,"
				     "bytes_exact,bytes_compressed,bytes_meta,bytes_dense_fp16,bytes_per_token_peak,"
				     "bytes_per_token_final,compression_vs_fp16_final,bytes_peak,"
				     "bytes_compressed_peak,cold_tier,cold_tier_used,perplexity,"
				     "meta_bytes_per_token_stream,meta_bytes_sequence\n";
	char line[4096];
	FILE *f = fopen(path, "r");
	int n = 0;

	cr_assert_not_null(f, "%s", path);
	cr_assert_not_null(fgets(line, sizeof(line), f));
	cr_assert_str_eq(line, header);
	while (n < cap && fgets(line, sizeof(line), f))
		parse_row(line, &rows[n++]);
	fclose(f);
	return n;
}

static void assert_exact_row(const struct row *r, int with_logits)
{
	cr_assert(r->value[COL_ATTENTION_ERROR] < 1e-5, "exact attention error %g", r->value[COL_ATTENTION_ERROR]);
	/* fp32 storage plus the block tables: a little over twice the dense fp16 bytes at the end, and more
	 * over the run, since blocks are allocated whole */
	cr_assert(r->value[COL_COMPRESSION_FINAL] > 0.3 && r->value[COL_COMPRESSION_FINAL] <= 0.5,
		  "exact compression %g", r->value[COL_COMPRESSION_FINAL]);
	cr_assert(r->value[COL_COMPRESSION] > 0.1 && r->value[COL_COMPRESSION] <= r->value[COL_COMPRESSION_FINAL],
		  "exact compression on the mean %g", r->value[COL_COMPRESSION]);
	cr_assert(r->value[COL_TOKENS_PER_S] > 0);
	if (!with_logits) {
		cr_assert(isnan(r->value[COL_KL_MEAN]) && isnan(r->value[COL_TOP1]), "a trace has no logits");
		return;
	}
	cr_assert(r->value[COL_KL_MEAN] < 1e-6, "exact KL %g", r->value[COL_KL_MEAN]);
	cr_assert(r->value[COL_KL_P99] < 1e-6, "exact KL p99 %g", r->value[COL_KL_P99]);
	cr_assert_eq(r->value[COL_TOP1], 1.0, "exact top-1 agreement %g", r->value[COL_TOP1]);
}

/* A compressed spec holds fewer bytes and is measurably, but not wildly, off. */
static void assert_compressed_row(const struct row *r, const struct row *exact, int with_logits)
{
	cr_assert_lt(r->value[COL_BYTES_PER_TOKEN], exact->value[COL_BYTES_PER_TOKEN]);
	cr_assert_gt(r->value[COL_COMPRESSION], exact->value[COL_COMPRESSION]);
	cr_assert(r->value[COL_ATTENTION_ERROR] > 1e-4 && r->value[COL_ATTENTION_ERROR] < 0.5,
		  "attention error %g", r->value[COL_ATTENTION_ERROR]);
	if (!with_logits)
		return;
	cr_assert(r->value[COL_KL_MEAN] > 0 && r->value[COL_KL_MEAN] < 0.1, "KL %g", r->value[COL_KL_MEAN]);
	cr_assert_geq(r->value[COL_KL_P99], r->value[COL_KL_MEAN]);
	cr_assert(r->value[COL_TOP1] > 0.9 && r->value[COL_TOP1] <= 1.0, "top-1 %g", r->value[COL_TOP1]);
}

Test(ab, kjv64_exact_against_turboquant_3bit)
{
	char csv[256], args[2048], out[8192];
	struct row rows[4];

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--model %s --steps 256 --spec '' --spec '" TQ3 "' --csv %s",
		 model_path("kjv-64.bin"), csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_not_null(strstr(out, "bytes/tok"), "the table is printed: %s", out);
	cr_assert_eq(read_csv(csv, rows, 4), 2);
	cr_assert_str_eq(rows[0].spec, "");
	cr_assert_str_eq(rows[1].spec, TQ3);
	cr_assert_eq(rows[0].value[COL_TOKENS], 256);
	assert_exact_row(&rows[0], 1);
	assert_compressed_row(&rows[1], &rows[0], 1);
	unlink(csv);
}

static long file_size(const char *path)
{
	FILE *f = fopen(path, "rb");
	long n;

	cr_assert_not_null(f, "%s", path);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fclose(f);
	return n;
}

/* Records 64 positions of kjv-64 (4 layers, 4 query heads, 2 KV heads, head_dim 64) into trace. */
static void record_kjv(const char *trace)
{
	char args[2048], out[8192];

	snprintf(args, sizeof(args), "--model %s --steps 64 --record %s", model_path("kjv-64.bin"), trace);
	cr_assert_eq(run("kvpager-llama", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(file_size(trace), KVP_TRACE_HEADER_BYTES + 64 * 4 * (long)kvp_trace_record_bytes(4, 2, 64));
}

Test(ab, recorded_trace_replays)
{
	char trace[256], csv[256], args[2048], out[8192];
	struct row rows[4];

	record_kjv(temp_path(trace, sizeof(trace), ".trace"));
	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--trace %s --spec '' --spec 'block=16,sinks=4,window=16," TQ3 "' --csv %s",
		 trace, csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(read_csv(csv, rows, 4), 2);
	cr_assert_eq(rows[0].value[COL_TOKENS], 64);
	assert_exact_row(&rows[0], 0);
	assert_compressed_row(&rows[1], &rows[0], 0);
	unlink(csv);
	unlink(trace);
}

/* Copies the first n bytes of src to dst, then overwrites the bytes at `at` with patch (if any). */
static void damaged_copy(const char *src, const char *dst, long n, long at, const char *patch)
{
	FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
	char *buf = malloc((size_t)n);

	cr_assert(in && out && buf);
	cr_assert_eq(fread(buf, 1, (size_t)n, in), (size_t)n);
	if (patch)
		memcpy(buf + at, patch, strlen(patch));
	fwrite(buf, 1, (size_t)n, out);
	fclose(in);
	fclose(out);
	free(buf);
}

static void expect_bad_input(const char *args, const char *words)
{
	char out[8192];

	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 2, "%s: %s", args, out);
	cr_assert_not_null(strstr(out, words), "%s: the message says '%s': %s", args, words, out);
}

Test(ab, damaged_traces_and_checkpoints_exit_2)
{
	char trace[256], bad[256], args[2048];

	record_kjv(temp_path(trace, sizeof(trace), ".trace"));
	temp_path(bad, sizeof(bad), ".trace");
	damaged_copy(trace, bad, file_size(trace) - 100, 0, NULL);
	snprintf(args, sizeof(args), "--trace %s", bad);
	expect_bad_input(args, "truncated");
	damaged_copy(trace, bad, 40, 0, NULL);
	expect_bad_input(args, "truncated");
	damaged_copy(trace, bad, file_size(trace), 0, "KVPTRACX");
	expect_bad_input(args, "magic");
	damaged_copy(trace, bad, file_size(trace), 8, "\x07");
	expect_bad_input(args, "version 7");
	damaged_copy(trace, bad, file_size(trace), 24, "\x03");
	expect_bad_input(args, "n_kv_heads 3 does not divide");
	/* the second record claims layer 2 where layer 1 belongs */
	damaged_copy(trace, bad, file_size(trace), KVP_TRACE_HEADER_BYTES + (long)kvp_trace_record_bytes(4, 2, 64),
		     "\x02");
	expect_bad_input(args, "layer 2 where layer 1 belongs");
	damaged_copy(model_path("kjv-64.bin"), bad, 100000, 0, NULL);
	snprintf(args, sizeof(args), "--model %s --tokenizer %s", bad, model_path("tok512.bin"));
	expect_bad_input(args, "truncated");
	snprintf(args, sizeof(args), "--trace /nonexistent/kvp.trace");
	expect_bad_input(args, "cannot open");
	unlink(bad);
	unlink(trace);
}

Test(ab, bad_options_and_specs_exit_2)
{
	expect_bad_input("--no-such-option", "unknown option '--no-such-option'");
	expect_bad_input("--tokens", "--tokens needs a value");
	expect_bad_input("--tokens 0", "--tokens wants an integer");
	expect_bad_input("--tokens 64 --spec 'no_such_key=1'", "spec 'no_such_key=1'");
	expect_bad_input("--tokens 64 --spec 'k=turboquant(bits=9)'", "turboquant");
	expect_bad_input("--model a --trace b", "two sources");
	expect_bad_input("--tokens 64 --plugin /nonexistent/libkvpager.so.1", "cannot load the plugin");
	expect_bad_input("--tokens=64 --bogus=1", "unknown option '--bogus'");
	expect_bad_input("--model=a --every=4", "--every thins the comparisons of a trace");
	expect_bad_input("--tokens=64 '--spec=k=turboquant(bits=9)'", "turboquant");
}

Test(ab, builtin_synthetic_default_run_with_plot)
{
	char csv[256], svg[256], args[1024], out[8192], head[8];
	struct row rows[8];
	FILE *f;
	int i;

	temp_path(csv, sizeof(csv), ".csv");
	temp_path(svg, sizeof(svg), ".svg");
	/* 3072 tokens: past the policies' 2048-token budget, so they evict */
	snprintf(args, sizeof(args), "--tokens 3072 --every 32 --csv %s --plot %s", csv, svg);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_not_null(strstr(out, "synthetic trace: 3072 tokens"), "%s", out);
	cr_assert_eq(read_csv(csv, rows, 8), 7, "seven default specs");
	cr_assert_str_eq(rows[0].spec, "store=fp32");
	assert_exact_row(&rows[0], 0);
	for (i = 1; i < 7; i++)
		assert_compressed_row(&rows[i], &rows[0], 0);
	for (i = 1; i < 4; i++)
		cr_assert_gt(rows[i].value[COL_COMPRESSION], 1.0, "%s compresses past fp16", rows[i].spec);
	/* more bits, less error */
	cr_assert_lt(rows[1].value[COL_ATTENTION_ERROR], rows[2].value[COL_ATTENTION_ERROR]);
	/* the generator's heads attend to heavy hitters a recent window misses */
	cr_assert_lt(rows[5].value[COL_ATTENTION_ERROR], rows[4].value[COL_ATTENTION_ERROR], "TriAttention against "
		     "StreamingLLM");
	/* the axes multiply: at the end the stacked spec holds fewer bytes than either part alone (over the
	 * run it does not: with a policy, a block is encoded only once a round has scored it, and the first
	 * round comes at 2048 + 128 tokens) */
	cr_assert_lt(rows[6].value[COL_BYTES_PER_TOKEN_FINAL], rows[5].value[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_lt(rows[6].value[COL_BYTES_PER_TOKEN_FINAL], rows[2].value[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_lt(rows[6].value[COL_BYTES_PER_TOKEN], rows[5].value[COL_BYTES_PER_TOKEN]);
	f = fopen(svg, "r");
	cr_assert_not_null(f);
	cr_assert_eq(fread(head, 1, 4, f), 4);
	fclose(f);
	cr_assert_eq(memcmp(head, "<svg", 4), 0);
	unlink(csv);
	unlink(svg);
}

/* Policies may not be served yet: a clean refusal (status 2 naming the spec) or a measured row both pass. */
/* The acceptance run: the exact cache, StreamingLLM, TriAttention, and TriAttention stacked with
 * TurboQuant, on kjv-64 through the plugin. */
Test(ab, kjv64_exact_streaming_triattention_and_stacked_specs)
{
	static const char *const specs[] = {
		"", "policy=streaming(sinks=4,window=64)", "policy=triattention(ratio=0.5)",
		"policy=triattention(ratio=0.25),k=turboquant(bits=3),v=turboquant(bits=3)",
	};
	char csv[256], args[2048], out[16384];
	struct row rows[4];

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--model %s --steps 256 --spec '%s' --spec '%s' --spec '%s' --spec '%s' --csv %s",
		 model_path("kjv-64.bin"), specs[0], specs[1], specs[2], specs[3], csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(read_csv(csv, rows, 4), 4);
	assert_exact_row(&rows[0], 1);
	for (int i = 1; i < 4; i++) {
		const double *v = rows[i].value;
		cr_assert_str_eq(rows[i].spec, specs[i]);
		cr_assert_eq(v[COL_TOKENS], 256);
		/* at the end: ratio=0.5's only round runs at the last step, so over the run it held more */
		cr_assert_lt(v[COL_BYTES_PER_TOKEN_FINAL], rows[0].value[COL_BYTES_PER_TOKEN_FINAL],
			     "%s keeps fewer bytes", specs[i]);
		cr_assert(v[COL_KL_MEAN] >= 0 && v[COL_KL_MEAN] < 0.1, "%s: KL %g", specs[i], v[COL_KL_MEAN]);
		cr_assert_geq(v[COL_KL_P99], v[COL_KL_MEAN]);
		cr_assert(v[COL_TOP1] >= 0.9 && v[COL_TOP1] <= 1.0, "%s: top-1 %g", specs[i], v[COL_TOP1]);
		cr_assert(v[COL_ATTENTION_ERROR] < 0.5, "%s: attention error %g", specs[i], v[COL_ATTENTION_ERROR]);
	}
	/* a 68-token budget drops tokens from position 69 on: the output must move */
	cr_assert_gt(rows[1].value[COL_KL_MEAN], 0);
	cr_assert_gt(rows[3].value[COL_KL_MEAN], 0);
	unlink(csv);
}

/* The pager's bookkeeping at block=64 on a real run: what it grows by is at most a byte per token per
 * stream (one layer's K or V of one KV head), for the plain cache and with each policy stacked on a cold
 * tier (TriAttention per KV head and per layer and head). The column is bytes_meta's growth after the first position over twice the tokens appended since. */
Test(ab, kjv64_metadata_is_at_most_a_byte_per_token_per_stream_at_block_64)
{
	static const char *const specs[] = {
		"block=64,store=fp16",
		"block=64,window=64,store=fp16,policy=streaming(sinks=4,window=124)," TQ3,
		"block=64,window=64,store=fp16,policy=h2o(heavy=0.0625,recent=0.0625,every=16)," TQ3,
		"block=64,window=64,store=fp16,policy=triattention(budget=128)," TQ3,
		"block=64,window=64,store=fp16,policy=triattention(budget=128,select=per_layer_head)," TQ3,
	};
	char csv[256], args[2048], out[16384];
	struct row rows[5];

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args),
		 "--model %s --steps 512 --spec '%s' --spec '%s' --spec '%s' --spec '%s' --spec '%s' --csv %s",
		 model_path("kjv-64.bin"), specs[0], specs[1], specs[2], specs[3], specs[4], csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(read_csv(csv, rows, 5), 5);
	cr_assert_not_null(strstr(out, "meta/tok"), "the table shows the figure: %s", out);
	for (int i = 0; i < 5; i++) {
		const double *v = rows[i].value;
		/* kjv-64: 4 layers x 2 KV heads, a K and a V stream each; one token each after the first position */
		double want = (v[COL_BYTES_META] - v[COL_META_SEQUENCE]) / (2.0 * 4 * 2 * (v[COL_TOKENS] - 1));
		cr_assert_str_eq(rows[i].spec, specs[i]);
		cr_assert(v[COL_META_SEQUENCE] > 0 && v[COL_META_SEQUENCE] < v[COL_BYTES_META], "%s: %g of %g", specs[i],
			  v[COL_META_SEQUENCE], v[COL_BYTES_META]);
		cr_assert_float_eq(v[COL_META_PER_TOKEN_STREAM], want, 1e-6 * want, "%s: %g, not %g", specs[i],
				   v[COL_META_PER_TOKEN_STREAM], want);
		cr_assert(v[COL_META_PER_TOKEN_STREAM] > 0 && v[COL_META_PER_TOKEN_STREAM] <= 1.0,
			  "%s: %g bytes of metadata per token per stream", specs[i], v[COL_META_PER_TOKEN_STREAM]);
	}
	unlink(csv);
}

/* ---- the plot and the HTML report ---- */

/* A result as the plot sees it: the rest of the fields as a run without logits leaves them. */
static struct ab_result plotted(const char *spec, double bytes_per_token, double kl)
{
	struct ab_result r = { .spec = spec, .tokens = 512, .bytes_per_token = bytes_per_token,
			       .compression = 1024.0 / bytes_per_token, .kl_mean = kl, .kl_p99 = kl,
			       .top1 = NAN, .attention_error = 0.1, .attention_error_max = 0.2,
			       .tokens_per_s = 1000 };

	return r;
}

/* The SVG ab_write_svg makes of r, read back whole (the caller frees it). */
static char *svg_of(const struct ab_result *r, int n, const char *title)
{
	char path[256], message[AB_MESSAGE_MAX], *text;
	long size;
	FILE *f;

	temp_path(path, sizeof(path), ".svg");
	cr_assert_eq(ab_write_svg(path, title, r, n, message), 0, "%s", message);
	size = file_size(path);
	text = calloc(1, (size_t)size + 1);
	f = fopen(path, "r");
	cr_assert(text && f);
	cr_assert_eq(fread(text, 1, (size_t)size, f), (size_t)size);
	fclose(f);
	unlink(path);
	return text;
}

/* Where the SVG draws the point labelled label: 1, or 0 when it is not drawn. */
static int point_at(const char *svg, const char *label, double *x, double *y)
{
	char key[64];
	const char *at;

	snprintf(key, sizeof(key), "class=\"point\" data-label=\"%s\"", label);
	at = strstr(svg, key);
	if (!at)
		return 0;
	cr_assert_eq(sscanf(at + strlen(key), " transform=\"translate(%lf,%lf)\"", x, y), 2, "%.80s", at);
	return 1;
}

static int svg_width(const char *svg)
{
	int width = 0;

	cr_assert_eq(sscanf(strstr(svg, " width=\""), " width=\"%d\"", &width), 1);
	return width;
}

/* The text of the legend entry for label, its wrapped lines joined. */
static void legend_text(const char *svg, const char *label, char *out, size_t cap)
{
	char key[64];
	const char *s, *end;
	size_t n = 0;
	int in_tag = 0;

	snprintf(key, sizeof(key), "class=\"legend\" data-label=\"%s\"", label);
	s = strstr(svg, key);
	cr_assert_not_null(s, "the legend has %s", label);
	s = strchr(s, '>') + 1;
	end = strstr(s, "</text>");
	for (; s < end; s++) {
		if (*s == '<' || *s == '>')
			in_tag = *s == '<';
		else if (!in_tag && n + 1 < cap)
			out[n++] = *s;
	}
	out[n] = '\0';
}

Test(ab, svg_axes_are_logarithmic_with_zero_on_a_floor_line)
{
	struct ab_result r[4] = { plotted("a", 100, 1e-1), plotted("b", 200, 1e-4), plotted("c", 400, 1e-3),
				  plotted("d", 800, 0) };
	double x[4], y[4];
	char *svg = svg_of(r, 4, "log axes");
	int i;

	for (i = 0; i < 4; i++) {
		char label[16];

		snprintf(label, sizeof(label), "S%d", i + 1);
		cr_assert(point_at(svg, label, &x[i], &y[i]), "%s is drawn", label);
	}
	/* 1e-1 and 1e-4 far apart, 1e-3 a third of the way up from 1e-4 as the decades say */
	cr_assert_gt(y[1] - y[0], 150, "KL 1e-1 at y %g, 1e-4 at y %g", y[0], y[1]);
	cr_assert_float_eq((y[1] - y[2]) / (y[1] - y[0]), 1.0 / 3, 0.01, "1e-3 at y %g", y[2]);
	/* bytes doubling: equal steps across */
	cr_assert_float_eq(x[2] - x[1], x[1] - x[0], 0.2);
	cr_assert_float_eq(x[3] - x[2], x[1] - x[0], 0.2);
	/* KL 0: below every positive value, on the dashed line, and the legend says so */
	cr_assert_gt(y[3], y[1] + 10);
	cr_assert_not_null(strstr(svg, "stroke-dasharray"));
	cr_assert_not_null(strstr(svg, "d  (800.0 B/token, 1.28x vs fp16, KL 0, drawn on the 0 line)"));
	free(svg);
}

Test(ab, svg_width_fits_a_long_spec_and_wraps_past_its_maximum)
{
	static const char long_spec[] = "policy=triattention(budget=2048,stats=online),k=turboquant(bits=3),"
					"v=turboquant(bits=3),block=64,sinks=4,window=128";
	struct ab_result r[2] = { plotted("store=fp32", 4096, 1e-8), plotted("k=kivi(bits=2)", 1024, 1e-2) };
	char huge[1200], text[2048], *svg;
	int narrow, wide, i;

	svg = svg_of(r, 2, "short");
	narrow = svg_width(svg);
	free(svg);
	r[1].spec = long_spec;
	svg = svg_of(r, 2, "short");
	wide = svg_width(svg);
	/* 12 px monospace is 7.2 px a character: the whole entry fits on one line */
	cr_assert_gt(wide, narrow, "a %zu-character spec widens the plot", strlen(long_spec));
	cr_assert_geq(wide, 7.2 * (double)(strlen(long_spec) + 50));
	legend_text(svg, "S2", text, sizeof(text));
	cr_assert_eq(strncmp(text, long_spec, strlen(long_spec)), 0, "%s", text);
	free(svg);
	/* past the maximum the width stops growing and the entry wraps, every character kept */
	for (i = 0; i + 1 < (int)sizeof(huge); i++)
		huge[i] = "k=kivi(bits=2),"[i % 15];
	huge[sizeof(huge) - 1] = '\0';
	r[1].spec = huge;
	svg = svg_of(r, 2, "short");
	cr_assert_leq(svg_width(svg), 1200);
	legend_text(svg, "S2", text, sizeof(text));
	cr_assert_eq(strncmp(text, huge, strlen(huge)), 0, "the wrapped spec, joined: %s", text);
	cr_assert_not_null(strstr(strstr(svg, "class=\"legend\" data-label=\"S2\""), "</tspan><tspan"), "wrapped");
	free(svg);
}

/* The boxes the 11 px bold monospace labels take, from their text's position (x, baseline y). */
static void label_box(const char *svg, int i, double box[4])
{
	char key[64];
	const char *at;
	double x, y;

	snprintf(key, sizeof(key), "class=\"label\" data-label=\"S%d\"", i + 1);
	at = strstr(svg, key);
	cr_assert_not_null(at, "label S%d is drawn", i + 1);
	cr_assert_eq(sscanf(at + strlen(key), " x=\"%lf\" y=\"%lf\"", &x, &y), 2);
	box[0] = x;
	box[1] = y - 10;
	box[2] = x + 6.7 * (i + 1 >= 10 ? 3 : 2);
	box[3] = y + 1;
}

Test(ab, svg_labels_s1_to_sn_do_not_overlap)
{
	struct ab_result r[14];
	double box[14][4];
	char *svg;
	int i, j;

	/* a cluster: 14 specs within 3% of each other's bytes and KL */
	for (i = 0; i < 14; i++)
		r[i] = plotted("k=kivi(bits=2),v=kivi(bits=2)", 1000 + 2 * i, 1e-3 * (1 + 0.002 * (i % 4)));
	r[0] = plotted("store=fp32", 4000, 1e-8); /* spreads the axes: the rest crowd together */
	svg = svg_of(r, 14, "crowded");
	for (i = 0; i < 14; i++)
		label_box(svg, i, box[i]);
	for (i = 0; i < 14; i++)
		for (j = i + 1; j < 14; j++)
			cr_assert(box[i][2] <= box[j][0] || box[j][2] <= box[i][0] || box[i][3] <= box[j][1] ||
					  box[j][3] <= box[i][1],
				  "S%d at (%g, %g) and S%d at (%g, %g) overlap", i + 1, box[i][0], box[i][1], j + 1,
				  box[j][0], box[j][1]);
	free(svg);
}

Test(ab, best_tradeoff_curve_keeps_specs_nothing_beats)
{
	struct ab_result r[5] = { plotted("a", 100, 1e-2), plotted("b", 200, 1e-3), plotted("c", 300, 1e-2),
				  plotted("d", 400, NAN), plotted("e", 50, 1e-1) };
	int on[5], expected[5] = { 1, 1, 0, 0, 1 }, i;
	char *svg;

	cr_assert_eq(ab_pareto(r, 5, on), 1, "KL where specs have it");
	for (i = 0; i < 5; i++)
		cr_assert_eq(on[i], expected[i], "spec %s", r[i].spec);
	svg = svg_of(r, 5, "front");
	cr_assert_not_null(strstr(svg, "<polyline class=\"front\""));
	cr_assert_not_null(strstr(svg, "d  (400.0 B/token, 2.56x vs fp16, KL n/a, not drawn)"));
	free(svg);
	/* without KL, the attention error decides: c (300 B) is beaten by b (200 B) */
	for (i = 0; i < 5; i++) {
		r[i].kl_mean = NAN;
		r[i].attention_error = (double[]){ 0.3, 0.2, 0.25, 0.1, 0.5 }[i];
	}
	cr_assert_eq(ab_pareto(r, 5, on), 0);
	for (i = 0; i < 5; i++)
		cr_assert_eq(on[i], i != 2, "spec %s", r[i].spec);
}

Test(ab, html_escapes_every_spec_and_the_title)
{
	struct ab_result r[2] = { plotted("<script>alert(\"x&y\")</script>", 100, 1e-3), plotted("'", 50, 1e-2) };
	char path[256], message[AB_MESSAGE_MAX], page[65536];
	size_t n;
	FILE *f;

	temp_path(path, sizeof(path), ".html");
	cr_assert_eq(ab_write_html(path, "<b>title</b>", r, 2, message), 0, "%s", message);
	f = fopen(path, "r");
	cr_assert_not_null(f);
	n = fread(page, 1, sizeof(page) - 1, f);
	page[n] = '\0';
	fclose(f);
	unlink(path);
	cr_assert_null(strstr(page, "<script>alert"), "a spec is text, never markup");
	cr_assert_null(strstr(page, "<b>title"));
	cr_assert_not_null(strstr(page, "<td class=\"spec\">&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;"
					"</td>"));
	cr_assert_not_null(strstr(page, "<td class=\"spec\">&#39;</td>"));
	cr_assert_not_null(strstr(page, "<h1>&lt;b&gt;title&lt;/b&gt;</h1>"));
	/* self-contained: nothing fetched */
	cr_assert_null(strstr(page, "src="));
	cr_assert_null(strstr(page, "<link"));
	cr_assert_null(strstr(page, "url("));
	cr_assert_null(strstr(page, "@import"));
}

/* The browser for the report's test, or NULL: the test then skips, saying so (CI installs chromium). */
static const char *chromium_path(void)
{
	static char path[512];
	FILE *p = popen("command -v chromium || command -v chromium-browser", "r");
	int found;

	cr_assert_not_null(p);
	found = fgets(path, sizeof(path), p) != NULL;
	pclose(p);
	if (!found) {
		fprintf(stderr, "[SKIP] %s::%s: chromium is not installed (apt-get install chromium)\n",
			criterion_current_test->category, criterion_current_test->name);
		cr_skip_test("chromium is not installed (apt-get install chromium)");
	}
	path[strcspn(path, "\n")] = '\0';
	return path;
}

/* Headless chromium on url with what (--dump-dom, --screenshot=...), its stdout and stderr into files;
 * killed after 60 s, so a browser that hangs fails the test instead of stalling the suite. */
static void run_chromium(const char *browser, const char *what, const char *url, const char *out, const char *err)
{
	char profile[] = "/tmp/kvp_test_ab_chromium_XXXXXX", cmd[4096];
	int st;

	cr_assert_not_null(mkdtemp(profile));
	snprintf(cmd, sizeof(cmd), "timeout -k 5 60 %s --headless --disable-gpu --no-sandbox --disable-dev-shm-usage "
		 "--hide-scrollbars --user-data-dir=%s --enable-logging=stderr --v=0 %s '%s' >%s 2>%s; "
		 "status=$?; rm -rf %s; exit $status", browser, profile, what, url, out, err, profile);
	st = system(cmd);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 124, "chromium timed out: %s", cmd);
	cr_assert_eq(WEXITSTATUS(st), 0, "%s: see %s", cmd, err);
}

static char *read_all(const char *path)
{
	long size = file_size(path);
	char *text = calloc(1, (size_t)size + 1);
	FILE *f = fopen(path, "r");

	cr_assert(text && f, "%s", path);
	cr_assert_eq(fread(text, 1, (size_t)size, f), (size_t)size);
	fclose(f);
	return text;
}

/* kvpager-ab's page in a real browser: its script runs without an error or any console message, every
 * spec is in the table in full, a click's sort (#sort=4: bytes per token) orders the rows, and a
 * screenshot is kept in the build directory for a look. */
Test(ab, html_report_renders_in_headless_chromium)
{
	static const char *const specs[] = {
		"store=fp32", "k=turboquant(bits=3),v=turboquant(bits=3)", "k=kivi(bits=2),v=kivi(bits=2)",
		"policy=streaming(sinks=4,window=200)",
		"policy=streaming(sinks=4,window=200),k=turboquant(bits=3),v=turboquant(bits=3)",
	};
	const char *browser = chromium_path(), *shot = build_path("tests/ab_report.png");
	char html[256], csv[256], dom[256], err[256], args[2048], out[8192], url[512], cell[4096];
	char *page, *log, *at, *last = NULL;
	struct row rows[8];
	unsigned char png[8];
	double bytes = 0;
	FILE *f;
	int i, n;

	temp_path(html, sizeof(html), ".html");
	temp_path(csv, sizeof(csv), ".csv");
	temp_path(dom, sizeof(dom), ".dom");
	temp_path(err, sizeof(err), ".log");
	snprintf(args, sizeof(args), "--tokens 512 --every 16 --csv %s --report %s", csv, html);
	for (i = 0; i < 5; i++)
		snprintf(args + strlen(args), sizeof(args) - strlen(args), " --spec '%s'", specs[i]);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(n = read_csv(csv, rows, 8), 5);

	snprintf(url, sizeof(url), "file://%s#sort=4", html);
	run_chromium(browser, "--dump-dom", url, dom, err);
	page = read_all(dom);
	log = read_all(err);
	cr_assert_not_null(strstr(page, "data-report=\"ready\""), "the script ran to its end: %.300s", page);
	cr_assert_null(strstr(log, ":CONSOLE"), "console output: %s", strstr(log, ":CONSOLE"));
	cr_assert_not_null(strstr(page, "<svg"), "the plot is inline");
	/* every spec in full, and the rows in order of bytes per token */
	for (at = page; (at = strstr(at, "<td class=\"spec\">")); at++) {
		for (i = 0; i < n; i++) {
			snprintf(cell, sizeof(cell), "<td class=\"spec\">%s</td>", rows[i].spec);
			if (!strncmp(at, cell, strlen(cell)))
				break;
		}
		cr_assert_lt(i, n, "a row of no spec: %.200s", at);
		cr_assert_geq(rows[i].value[COL_BYTES_PER_TOKEN], bytes, "%s after %s", rows[i].spec, last);
		bytes = rows[i].value[COL_BYTES_PER_TOKEN];
		last = rows[i].spec;
	}
	for (i = 0; i < n; i++) {
		snprintf(cell, sizeof(cell), "<td class=\"spec\">%s</td>", specs[i]);
		cr_assert_not_null(strstr(page, cell), "%s is in the table", specs[i]);
	}
	free(page);
	free(log);

	snprintf(url, sizeof(url), "file://%s", html);
	snprintf(cell, sizeof(cell), "--screenshot=%s --window-size=1280,900", shot);
	unlink(shot);
	run_chromium(browser, cell, url, dom, err);
	f = fopen(shot, "rb");
	cr_assert_not_null(f, "the screenshot %s", shot);
	cr_assert_eq(fread(png, 1, 8, f), 8);
	fclose(f);
	cr_assert_eq(memcmp(png, "\x89PNG\r\n\x1a\n", 8), 0, "%s is a PNG", shot);
	/* a blank 1280x900 page compresses to a few KB; the plot and the table take far more */
	cr_assert_gt(file_size(shot), 30000, "%s has the page on it", shot);
	unlink(html);
	unlink(csv);
	unlink(dom);
	unlink(err);
}

/* ---- memory figures: the run's mean, its peak, the final snapshot; a cold tier that stayed empty ---- */

#define SILENT_STACK "policy=streaming(window=28),block=16,sinks=4,window=16," TQ3
#define USED_STACK "block=16,sinks=4,window=16," TQ3

/* Runs kjv-64 for steps positions with the specs (a NULL-terminated list); the CSV into rows, the table
 * and notes into out. Returns the number of rows. */
static int run_kjv(int steps, const char *const *specs, struct row *rows, int cap, char *out, size_t out_cap)
{
	char csv[256], args[4096];
	int at, n;

	temp_path(csv, sizeof(csv), ".csv");
	at = snprintf(args, sizeof(args), "--model %s --steps %d --csv %s", model_path("kjv-64.bin"), steps, csv);
	for (; *specs; specs++)
		at += snprintf(args + at, sizeof(args) - (size_t)at, " --spec '%s'", *specs);
	cr_assert_eq(run("kvpager-ab", args, out, out_cap), 0, "%s", out);
	n = read_csv(csv, rows, cap);
	unlink(csv);
	return n;
}

static double held_at_end(const struct row *r)
{
	return r->value[COL_BYTES_EXACT] + r->value[COL_BYTES_COMPRESSED] + r->value[COL_BYTES_META];
}

/* The figures of one row agree with each other and with its raw bytes. */
static void assert_memory_figures(const struct row *r)
{
	const double *v = r->value;

	cr_assert_float_eq(v[COL_BYTES_PER_TOKEN_FINAL] * v[COL_TOKENS], held_at_end(r), 1e-3, "%s", r->spec);
	cr_assert_float_eq(v[COL_BYTES_PER_TOKEN_PEAK] * v[COL_TOKENS], v[COL_BYTES_PEAK], 1e-3, "%s", r->spec);
	cr_assert_geq(v[COL_BYTES_PEAK], held_at_end(r), "%s: the peak is at least the end", r->spec);
	cr_assert_float_eq(v[COL_COMPRESSION_FINAL], v[COL_BYTES_DENSE_FP16] / held_at_end(r), 1e-6, "%s", r->spec);
}

/* TriAttention at ratio=0.5 over 256 positions runs its only round (due at 0.5 t + 128 tokens) at the last
 * step: it held every token, like the full cache, for the whole run, and half of them only at the end. */
Test(ab, mean_bytes_follow_the_run_not_the_last_round)
{
	static const char *const specs[] = { "", "policy=triattention(ratio=0.5)", NULL };
	char out[16384];
	struct row rows[2];

	cr_assert_eq(run_kjv(256, specs, rows, 2, out, sizeof(out)), 2);
	assert_memory_figures(&rows[0]);
	assert_memory_figures(&rows[1]);
	/* the full cache grows by whole blocks: its mean is near its end, a little above (block slack) */
	cr_assert(rows[0].value[COL_BYTES_PER_TOKEN] >= rows[0].value[COL_BYTES_PER_TOKEN_FINAL] &&
		  rows[0].value[COL_BYTES_PER_TOKEN] < 1.3 * rows[0].value[COL_BYTES_PER_TOKEN_FINAL],
		  "full cache: mean %g, final %g", rows[0].value[COL_BYTES_PER_TOKEN],
		  rows[0].value[COL_BYTES_PER_TOKEN_FINAL]);
	/* the policy ends at about half the full cache, but over the run it held as much */
	cr_assert_lt(rows[1].value[COL_BYTES_PER_TOKEN_FINAL], 0.6 * rows[0].value[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_gt(rows[1].value[COL_BYTES_PER_TOKEN], 2.0 * rows[1].value[COL_BYTES_PER_TOKEN_FINAL],
		     "mean %g against final %g", rows[1].value[COL_BYTES_PER_TOKEN],
		     rows[1].value[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_geq(rows[1].value[COL_BYTES_PER_TOKEN], 0.95 * rows[0].value[COL_BYTES_PER_TOKEN]);
	/* its peak came before the round: the full cache's, not the end's */
	cr_assert_geq(rows[1].value[COL_BYTES_PEAK], 0.95 * rows[0].value[COL_BYTES_PEAK]);
	cr_assert_gt(rows[1].value[COL_BYTES_PEAK], 1.8 * held_at_end(&rows[1]));
}

/* The row of a label (S1..Sn, or "full") in the table: the first line that starts with it followed by a
 * space. */
static const char *table_row(const char *out, const char *spec)
{
	size_t n = strlen(spec);

	for (const char *line = out; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
		if (!strncmp(line, spec, n) && line[n] == ' ')
			return line;
	cr_assert_fail("no row for %s in: %s", spec, out);
	return NULL;
}

Test(ab, vs_fp16_is_the_ratio_of_the_means)
{
	static const char *const specs[] = { "policy=triattention(ratio=0.5)", NULL };
	char out[16384], mean[32], final[32];
	const double *v;
	struct row rows[1];
	const char *line, *eol;

	cr_assert_eq(run_kjv(256, specs, rows, 1, out, sizeof(out)), 1);
	v = rows[0].value;
	/* dense fp16 grows by the same bytes every position, so its mean per token is its final per token */
	cr_assert_float_eq(v[COL_COMPRESSION], v[COL_BYTES_DENSE_FP16] / v[COL_TOKENS] / v[COL_BYTES_PER_TOKEN], 1e-6);
	/* fp32 storage of every token for the whole run: under 0.5x on the mean, near 1x at the end */
	cr_assert_lt(v[COL_COMPRESSION], 0.5);
	cr_assert_gt(v[COL_COMPRESSION_FINAL], 0.8);
	snprintf(mean, sizeof(mean), " %.2fx ", v[COL_COMPRESSION]);
	snprintf(final, sizeof(final), " %.2fx ", v[COL_COMPRESSION_FINAL]);
	line = table_row(out, "S1");
	eol = strchr(line, '\n');
	cr_assert(strstr(line, mean) && strstr(line, mean) < eol, "the table shows%son the mean: %s", mean, out);
	cr_assert(!strstr(line, final) || strstr(line, final) > eol, "not%sat the end: %s", final, out);
}

static int count(const char *s, const char *what)
{
	int n = 0;

	for (s = strstr(s, what); s; s = strstr(s + 1, what))
		n++;
	return n;
}

/* streaming(window=28) keeps 32 tokens (33 before a round); the sinks and hot window take 20, and a block
 * of 16 beyond them needs 36: the codecs never see a block. Without the policy they do. */
Test(ab, unused_cold_tier_is_noted_and_flagged)
{
	static const char *const specs[] = { SILENT_STACK, USED_STACK, "", NULL };
	char out[16384];
	struct row rows[3];

	cr_assert_eq(run_kjv(128, specs, rows, 3, out, sizeof(out)), 3);
	cr_assert_not_null(strstr(out, "note: '" SILENT_STACK "': its cold tier (k=/v=) never received a block: the "
				       "policy kept at most 33 tokens per stream, the sinks and the hot window take 20 "
				       "(sinks=4, window=16), and a block turns cold only once a full block=16 lies "
				       "beyond them (36 tokens)\n"), "%s", out);
	cr_assert_eq(count(out, "note: "), 1, "only the spec whose cold tier stayed empty: %s", out);
	cr_assert_eq(rows[0].value[COL_COLD_TIER], 1);
	cr_assert_eq(rows[0].value[COL_COLD_TIER_USED], 0);
	cr_assert_eq(rows[0].value[COL_BYTES_COMPRESSED_PEAK], 0);
	cr_assert_eq(rows[1].value[COL_COLD_TIER], 1);
	cr_assert_eq(rows[1].value[COL_COLD_TIER_USED], 1);
	cr_assert_gt(rows[1].value[COL_BYTES_COMPRESSED_PEAK], 0);
	cr_assert_eq(rows[2].value[COL_COLD_TIER], 0);
	cr_assert(isnan(rows[2].value[COL_COLD_TIER_USED]), "no cold tier: the field is empty");
}

/* The replayed sources sample the same way: a recent window's bytes stop growing, the mean does not. */
Test(ab, replayed_stream_reports_mean_peak_final_and_cold_tier)
{
	char csv[256], args[1024], out[16384];
	struct row rows[2];

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--tokens 512 --every 64 --spec '%s' --spec '%s' --csv %s", SILENT_STACK,
		 USED_STACK, csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(read_csv(csv, rows, 2), 2);
	unlink(csv);
	assert_memory_figures(&rows[0]);
	assert_memory_figures(&rows[1]);
	/* held stays near 33 tokens from position 33 on: the mean per token is near twice the final */
	cr_assert_gt(rows[0].value[COL_BYTES_PER_TOKEN], 1.5 * rows[0].value[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_eq(rows[0].value[COL_COLD_TIER_USED], 0);
	cr_assert_eq(rows[1].value[COL_COLD_TIER_USED], 1);
	cr_assert_not_null(strstr(out, "note: '" SILENT_STACK "'"), "%s", out);
	cr_assert_eq(count(out, "note: "), 1, "%s", out);
}

/* What the spec and the run's length decide is said before the run: a run shorter than sinks + window +
 * block (4 + 128 + 64 by default), or a policy that never keeps that many. */
Test(ab, cold_tier_out_of_reach_is_warned_before_the_run)
{
	static const char warning[] = "kvpager-ab: warning: spec '%s': its cold tier (k=/v=) can receive no block: %s, "
				      "and a block turns cold only once a stream holds %s\n";
	char args[1024], out[16384], expect[1024];
	const char *at;

	snprintf(args, sizeof(args), "--tokens 128 --spec '%s' --spec '%s' --spec 'k=turboquant(bits=3)' --spec ''",
		 SILENT_STACK, USED_STACK);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	snprintf(expect, sizeof(expect), warning, SILENT_STACK, "streaming keeps at most 33 tokens per stream",
		 "36 (sinks=4 + window=16 + block=16)");
	at = strstr(out, expect);
	cr_assert_not_null(at, "%s", out);
	cr_assert_lt(at, strstr(out, "bytes/tok"), "before the table: %s", out);
	snprintf(expect, sizeof(expect), warning, "k=turboquant(bits=3)", "the run has 128 positions",
		 "196 (sinks=4 + window=128 + block=64)");
	cr_assert_not_null(strstr(out, expect), "%s", out);
	cr_assert_eq(count(out, "warning: "), 2, "not for the spec whose cold tier is used: %s", out);
	/* and the run confirms both */
	cr_assert_not_null(strstr(out, "note: 'k=turboquant(bits=3)': its cold tier (k=/v=) never received a block: "
				       "the run has 128 positions, "), "%s", out);
	cr_assert_eq(count(out, "note: "), 2, "%s", out);
}

/* ---- --text: perplexity as llama.cpp's llama-perplexity computes it ---- */

#define TEXT_CHUNKS 3

/*
 * The rule written out again from llama-perplexity, with the in-process dense cache of tools/llama.c:
 * the file tokenized with BOS first, chunks of n_ctx with BOS at position 0, the logits at positions
 * n_ctx/2 .. n_ctx-2 scored against the next token.
 */
static double dense_perplexity(const char *model, const char *text, int n_ctx, int n_chunks)
{
	char err[LLAMA_ERROR_MAX] = "", *buf = malloc(200000);
	struct llama_model m;
	struct llama_tokenizer tok;
	struct llama_state st;
	struct llama_dense_cache dense;
	struct llama_attention att;
	int *ids = malloc(sizeof(int) * 200003), c, pos, v, n_scored = 0;
	FILE *f = fopen(text, "rb");
	double nll = 0, sum;
	size_t n;

	cr_assert(buf && ids && f);
	n = fread(buf, 1, 199999, f);
	buf[n] = '\0';
	fclose(f);
	cr_assert_eq(llama_model_load(&m, model, err), LLAMA_OK, "%s", err);
	cr_assert_eq(llama_tokenizer_load(&tok, model_path("tok512.bin"), m.config.vocab_size, err), LLAMA_OK);
	cr_assert_eq(llama_state_init(&st, &m.config), LLAMA_OK);
	cr_assert_eq(llama_dense_cache_init(&dense, &m.config), LLAMA_OK);
	att = llama_dense_attention(&dense);
	cr_assert_geq(llama_encode(&tok, buf, 1, 0, ids), n_chunks * n_ctx);
	for (c = 0; c < n_chunks; c++)
		for (pos = 0; pos < n_ctx - 1; pos++) {
			cr_assert_eq(llama_forward(&m, &st, &att, NULL, pos ? ids[c * n_ctx + pos] : 1, pos), 0);
			if (pos < n_ctx / 2)
				continue;
			for (sum = 0, v = 0; v < m.config.vocab_size; v++)
				sum += exp((double)st.logits[v]);
			nll += log(sum) - st.logits[ids[c * n_ctx + pos + 1]];
			n_scored++;
		}
	cr_assert_eq(n_scored, n_chunks * (n_ctx - 1 - n_ctx / 2));
	llama_dense_cache_free(&dense);
	llama_state_free(&st);
	llama_tokenizer_free(&tok);
	llama_model_free(&m);
	free(buf);
	free(ids);
	return exp(nll / n_scored);
}

/* The perplexity on the table line that starts with label. */
static double table_perplexity(const char *out, const char *label)
{
	const char *line = table_row(out, label);
	double v;

	cr_assert_eq(sscanf(line + strlen(label), "%lf", &v), 1, "%s", line);
	return v;
}

/* The exact cache reproduces the rule computed independently; a compressed cache and an evicting one
 * are measured against it on the same positions. */
Test(ab, text_perplexity_of_the_exact_cache_matches_the_rule)
{
	char csv[256], args[4096], out[16384];
	const char *model = model_path("kjv-64.bin"), *text = model_path("kjv-heldout.txt");
	double want = dense_perplexity(model, text, 512, TEXT_CHUNKS), full, exact, tq, streaming;
	struct row rows[4];

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--model %s --text %s --ctx 512 --chunks %d --spec '' --spec '" TQ3 "' "
		 "--spec 'policy=streaming(sinks=4,window=60)' --csv %s", model, text, TEXT_CHUNKS, csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_not_null(strstr(out, "3 chunks of 512"), "%s", out);
	cr_assert_not_null(strstr(out, "255 predictions scored per chunk (positions 256..510"), "%s", out);
	full = table_perplexity(out, "full");
	exact = table_perplexity(out, "S1");
	tq = table_perplexity(out, "S2");
	streaming = table_perplexity(out, "S3");
	/* printed with 6 decimals */
	cr_assert(fabs(full - want) <= 1e-6, "full cache %.6f, the rule %.7f", full, want);
	cr_assert(fabs(exact - want) <= 1e-6, "exact spec %.6f, the rule %.7f", exact, want);
	cr_assert(want > 5 && want < 7, "kjv-64 on held-out KJV: %g", want);
	cr_assert(fabs(tq / want - 1) < 0.01, "TurboQuant 3-bit moves perplexity by <1%%: %g", tq);
	cr_assert_neq(tq, exact);
	/* a 64-token window moves it, in either direction: on this text it lowers it 0.4% */
	cr_assert_gt(fabs(streaming - want), 1e-3, "streaming %g against %g", streaming, want);
	cr_assert_eq(read_csv(csv, rows, 4), 3);
	cr_assert_eq(rows[0].value[COL_TOKENS], TEXT_CHUNKS * 512);
	cr_assert(rows[0].value[COL_KL_MEAN] < 1e-6 && rows[0].value[COL_TOP1] == 1.0);
	cr_assert(fabs(rows[0].value[COL_PERPLEXITY] - exact) < 1e-5, "CSV perplexity %g, table %g",
		  rows[0].value[COL_PERPLEXITY], exact);
	cr_assert(rows[1].value[COL_KL_MEAN] > 0 && rows[1].value[COL_KL_MEAN] < 0.01, "TQ3 KL %g",
		  rows[1].value[COL_KL_MEAN]);
	cr_assert_gt(rows[2].value[COL_KL_MEAN], rows[1].value[COL_KL_MEAN], "eviction beyond the window");
	cr_assert_lt(rows[2].value[COL_TOP1], 1.0);
	cr_assert_lt(rows[1].value[COL_BYTES_PER_TOKEN], rows[0].value[COL_BYTES_PER_TOKEN]);
	cr_assert_lt(rows[2].value[COL_BYTES_PER_TOKEN], rows[0].value[COL_BYTES_PER_TOKEN]);
	unlink(csv);
}

/* A text file with these bytes. */
static const char *text_file(char *path, size_t cap, const char *bytes, size_t n)
{
	FILE *f = fopen(temp_path(path, cap, ".txt"), "wb");

	cr_assert_not_null(f);
	cr_assert_eq(fwrite(bytes, 1, n, f), n);
	fclose(f);
	return path;
}

Test(ab, text_bad_inputs_exit_2)
{
	char empty[256], nul[256], shortened[256], args[4096];
	const char *model = model_path("kjv-64.bin"), *text = model_path("kjv-heldout.txt");

	text_file(empty, sizeof(empty), "", 0);
	text_file(nul, sizeof(nul), "In the\0beginning", 16);
	text_file(shortened, sizeof(shortened), "In the beginning God created the heaven and the earth.", 54);
	snprintf(args, sizeof(args), "--model %s --text /nonexistent/kjv.txt", model);
	expect_bad_input(args, "cannot open the text /nonexistent/kjv.txt");
	snprintf(args, sizeof(args), "--model %s --text /tmp", model);
	expect_bad_input(args, "cannot read the text /tmp");
	snprintf(args, sizeof(args), "--model %s --text %s", model, empty);
	expect_bad_input(args, "is empty");
	snprintf(args, sizeof(args), "--model %s --text %s", model, nul);
	expect_bad_input(args, "NUL byte at offset 6");
	snprintf(args, sizeof(args), "--model %s --text %s", model, shortened);
	expect_bad_input(args, "shorter than one chunk of 512 tokens");
	snprintf(args, sizeof(args), "--model %s --text %s --ctx 513", model, text);
	expect_bad_input(args, "--ctx 513 is above the context");
	snprintf(args, sizeof(args), "--model %s --text %s --ctx 2", model, text);
	expect_bad_input(args, "--ctx wants an integer of at least 3");
	snprintf(args, sizeof(args), "--model %s --text %s --chunks 0", model, text);
	expect_bad_input(args, "--chunks wants an integer");
	snprintf(args, sizeof(args), "--model %s --text %s --steps 64", model, text);
	expect_bad_input(args, "not --text");
	snprintf(args, sizeof(args), "--text %s", text);
	expect_bad_input(args, "--text needs --model");
	snprintf(args, sizeof(args), "--model %s --ctx 64", model);
	expect_bad_input(args, "give --text");
	unlink(empty);
	unlink(nul);
	unlink(shortened);
}

/* --heads: per spec, every (layer, KV head)'s level, bits and budget; a 3-level bits ladder over kjv-64's 8
 * heads uses every level (3/2/3 by rank), its mean bits are the middle level's, and gate=off says so. */
Test(ab, heads_show_every_heads_level_bits_and_budget)
{
	const char *gated = "block=16,sinks=4,window=16,gate=entropy,ladder=(4:1,3:1,2:1)," TQ3
			    ",policy=triattention(budget=96,every=16,stats=online,select=per_layer_head)";
	char args[2048], out[16384];
	unsigned levels[3] = { 0 }, rows = 0, layer, kv, level, bits, budget;
	const char *at;

	snprintf(args, sizeof(args), "--heads --model %s --steps 160 --spec '" TQ3 "' --spec '%s'",
		 model_path("kjv-64.bin"), gated);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert(strstr(out, "gate=off: no per-head levels"), "%s", out);
	at = strstr(out, "aggressiveness level bits  budget");
	cr_assert(at, "%s", out);
	for (at = strchr(at, '\n') + 1; sscanf(at, " %u %u %*f %*f %u %u %u", &layer, &kv, &level, &bits, &budget) == 5;
	     at = strchr(at, '\n') + 1) {
		cr_assert_lt(level, 3, "%s", at);
		cr_assert_eq(bits, 4 - level, "level %u has %u bits", level, bits);
		cr_assert_eq(budget, 96, "a bits-only ladder keeps the policy's budget");
		levels[level]++;
		rows++;
	}
	cr_assert_eq(rows, 4 * 2, "one row per layer and KV head: %s", out);
	cr_assert(levels[0] == 3 && levels[1] == 2 && levels[2] == 3, "levels %u/%u/%u", levels[0], levels[1],
		  levels[2]);
	cr_assert(strstr(out, "heads per level: 0:3 1:2 2:3; mean bits 3.00; budgets 96..96 tokens"), "%s", out);
}

/* ---- the text mode's bytes, its plots; the table's labels; the progress lines ---- */

/* Each chunk is a sequence of its own from position 0: a 64-token window's bytes stop growing at
 * position 64, so over a 512-token chunk its mean per token is about twice its end's (a snapshot at each
 * chunk's end, as the text mode once reported, shows the end's). */
Test(ab, text_bytes_are_the_mean_over_every_position_of_every_chunk)
{
	char csv[256], args[4096], out[16384];
	const char *model = model_path("kjv-64.bin"), *text = model_path("kjv-heldout.txt");
	struct row rows[2];
	const double *full, *window;

	temp_path(csv, sizeof(csv), ".csv");
	snprintf(args, sizeof(args), "--model %s --text %s --ctx 512 --chunks 2 --spec 'store=fp16' "
		 "--spec 'store=fp16,policy=streaming(sinks=4,window=60)' --csv %s", model, text, csv);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(read_csv(csv, rows, 2), 2);
	unlink(csv);
	full = rows[0].value;
	window = rows[1].value;
	cr_assert_eq(full[COL_TOKENS], 1024);
	/* every token kept: the mean is near the end's, a little above (blocks are allocated whole) */
	cr_assert(full[COL_BYTES_PER_TOKEN] >= full[COL_BYTES_PER_TOKEN_FINAL] &&
		  full[COL_BYTES_PER_TOKEN] < 1.3 * full[COL_BYTES_PER_TOKEN_FINAL], "full: mean %g, final %g",
		  full[COL_BYTES_PER_TOKEN], full[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_gt(window[COL_BYTES_PER_TOKEN], 1.5 * window[COL_BYTES_PER_TOKEN_FINAL], "window: mean %g, final %g",
		     window[COL_BYTES_PER_TOKEN], window[COL_BYTES_PER_TOKEN_FINAL]);
	cr_assert_lt(window[COL_BYTES_PER_TOKEN], full[COL_BYTES_PER_TOKEN]);
	/* metadata per token per stream is each chunk's growth after its first position, not its fixed part
	 * spread over the tokens: every chunk starts a sequence of its own */
	for (int i = 0; i < 2; i++) {
		const double *v = rows[i].value;
		cr_assert(v[COL_META_SEQUENCE] > 0 && v[COL_META_SEQUENCE] * 2 < v[COL_BYTES_META], "%g of %g",
			  v[COL_META_SEQUENCE], v[COL_BYTES_META]);
		cr_assert(v[COL_META_PER_TOKEN_STREAM] > 0 && v[COL_META_PER_TOKEN_STREAM] <= 1.0, "%g",
			  v[COL_META_PER_TOKEN_STREAM]);
		cr_assert_float_eq(v[COL_META_PER_TOKEN_STREAM],
				   (v[COL_BYTES_META] - 2 * v[COL_META_SEQUENCE]) / (2.0 * 4 * 2 * (v[COL_TOKENS] - 2)),
				   1e-6, "%g", v[COL_META_PER_TOKEN_STREAM]);
	}
	/* the ratio on the mean: dense fp16 grows alike in every chunk */
	cr_assert_float_eq(window[COL_COMPRESSION],
			   window[COL_BYTES_DENSE_FP16] / window[COL_TOKENS] / window[COL_BYTES_PER_TOKEN], 1e-6);
	/* the peak is one chunk's sequence, not the two chunks' ends added up: per token, over one chunk */
	cr_assert_lt(full[COL_BYTES_PEAK], 0.6 * held_at_end(&rows[0]));
	cr_assert_float_eq(full[COL_BYTES_PER_TOKEN_PEAK] * 512, full[COL_BYTES_PEAK], 1e-3);
	/* the table shows the mean */
	snprintf(args, sizeof(args), " %.1f ", window[COL_BYTES_PER_TOKEN]);
	cr_assert_not_null(strstr(table_row(out, "S2"), args), "%s in %s", args, out);
}

/* Results of a --text run as the plots see them. */
static struct ab_result text_plotted(const char *spec, double bytes_per_token, double kl, double perplexity)
{
	struct ab_result r = plotted(spec, bytes_per_token, kl);

	r.perplexity = perplexity;
	r.attention_error = r.attention_error_max = NAN;
	return r;
}

/* The y of label's point in the part of the SVG from `from` on. */
static double point_y(const char *from, const char *label)
{
	double x, y;

	cr_assert(point_at(from, label, &x, &y), "%s is drawn", label);
	return y;
}

/* With perplexities, a second plot under the first: bytes against perplexity on a log axis whose ticks
 * resolve tenths of a percent; without them, one plot, as before. */
Test(ab, text_plot_has_a_second_plot_of_perplexity)
{
	struct ab_result r[3] = { text_plotted("a", 2000, 1e-8, 5.3806), text_plotted("b", 500, 2e-3, 5.3901),
				  text_plotted("c", 250, 1e-2, 5.4500) };
	char *svg = svg_of(r, 3, "text run"), *second;
	double y[3];
	int i;

	second = strstr(svg, "class=\"ab-plot-perplexity\"");
	cr_assert_not_null(second, "a second plot: %.400s", svg);
	cr_assert_not_null(strstr(second, ">perplexity (log scale)</text>"), "its y axis");
	for (i = 0; i < 3; i++) {
		char label[16];

		snprintf(label, sizeof(label), "S%d", i + 1);
		y[i] = point_y(second, label);
	}
	/* higher perplexity, higher up (smaller y); 5.3806 and 5.3901 (0.18% apart) more than 10 px apart */
	cr_assert_gt(y[0], y[1] + 10, "5.3806 at %g, 5.3901 at %g", y[0], y[1]);
	cr_assert_gt(y[1], y[2]);
	/* ticks at round values within the range: 5.4 is one */
	cr_assert_not_null(strstr(second, ">5.4</text>"), "a tick at 5.4: %s", second);
	/* the KL plot comes first and keeps the legend; the second refers to it */
	cr_assert_lt(strstr(svg, "class=\"legend\" data-label=\"S1\""), second);
	cr_assert_not_null(strstr(second, "the specs of the legend above"));
	free(svg);
	for (i = 0; i < 3; i++)
		r[i].perplexity = NAN;
	svg = svg_of(r, 3, "no text");
	cr_assert_null(strstr(svg, "ab-plot-perplexity"), "no perplexity, no second plot");
	free(svg);
}

/* --text --report: the page has both plots and a perplexity column; --plot the same SVG. */
Test(ab, text_report_and_plot_show_perplexity)
{
	char html[256], svg[256], args[4096], out[16384], *page;
	const char *model = model_path("kjv-64.bin"), *text = model_path("kjv-heldout.txt");

	temp_path(html, sizeof(html), ".html");
	temp_path(svg, sizeof(svg), ".svg");
	snprintf(args, sizeof(args), "--model %s --text %s --ctx 128 --chunks 2 --spec '' --spec '" TQ3 "' "
		 "--report %s --plot %s", model, text, html, svg);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	page = read_all(html);
	cr_assert_not_null(strstr(page, "class=\"ab-plot-perplexity\""), "the perplexity plot in the page");
	cr_assert_not_null(strstr(page, "<th data-type=\"num\">perplexity</th>"));
	cr_assert_not_null(strstr(page, "<td class=\"spec\">" "k=turboquant(bits=3),v=turboquant(bits=3)</td>"));
	free(page);
	page = read_all(svg);
	cr_assert_not_null(strstr(page, "class=\"ab-plot-perplexity\""), "and in the SVG");
	free(page);
	unlink(html);
	unlink(svg);
}

/* Long specs do not push the figures off the screen: rows are S1..Sn, each under 110 columns, the specs
 * are in a key under the table, whole; the CSV keeps them whole too. */
Test(ab, table_rows_are_labels_keyed_to_the_full_specs)
{
	static const char *const specs[] = {
		("block=16,sinks=4,window=16,store=fp16,policy=streaming(sinks=4,window=60),k=turboquant(bits=3),"
		 "v=turboquant(bits=3)"),
		("block=16,sinks=4,window=16,store=fp16,policy=triattention(budget=64,every=16),k=turboquant(bits=2),"
		 "v=turboquant(bits=3)"),
		NULL
	};
	char out[16384], key[512];
	struct row rows[2];
	const char *line, *eol;
	int i;

	cr_assert_eq(run_kjv(128, specs, rows, 2, out, sizeof(out)), 2);
	for (i = 0; i < 2; i++) {
		char label[16];

		snprintf(label, sizeof(label), "S%d", i + 1);
		line = table_row(out, label);
		eol = strchr(line, '\n');
		cr_assert_lt(eol - line, 110, "row %s is %td characters: %s", label, eol - line, out);
		snprintf(key, sizeof(key), "\n  S%d   %s\n", i + 1, specs[i]);
		cr_assert_not_null(strstr(out, key), "the key has %s: %s", specs[i], out);
		cr_assert_str_eq(rows[i].spec, specs[i], "the CSV has the spec whole");
	}
	cr_assert_lt(table_row(out, "S2"), strstr(out, "\nspec:\n"), "the key under the table");
}

/* The progress label: spec i of N, its S label, and what sets it apart, neither the items all specs
 * begin with nor those they end with, and not cut at 40 characters. */
Test(ab, progress_label_names_the_spec_by_what_sets_it_apart)
{
	static const char *const specs[] = {
		"block=16,sinks=4,window=16,store=fp16,policy=streaming(sinks=4,window=1020),k=turboquant(bits=3)",
		("block=16,sinks=4,window=16,store=fp16,policy=triattention(budget=1024,every=16,select=union),"
		 "k=turboquant(bits=3)"),
		"block=16,sinks=4,window=16,store=fp16,policy=h2o(heavy=0.25,recent=0.25),k=turboquant(bits=3)",
	};
	char buf[AB_PROGRESS_LABEL_MAX];

	cr_assert_str_eq(ab_progress_spec_label(buf, sizeof(buf), specs, 3, 1),
			 "spec 2 of 3 S2 policy=triattention(budget=1024,every=16,select=union)");
	cr_assert_str_eq(ab_progress_spec_label(buf, sizeof(buf), specs, 3, 0),
			 "spec 1 of 3 S1 policy=streaming(sinks=4,window=1020)");
	/* one spec: the whole of it; an empty one: named */
	cr_assert_str_eq(ab_progress_spec_label(buf, sizeof(buf), specs, 1, 0), "spec 1 of 1 S1 block=16,sinks=4,"
			 "window=16,store=fp16,policy=streaming(sinks=4,window=1020),k=turboquant(bits=3)");
	cr_assert_str_eq(ab_progress_spec_label(buf, sizeof(buf), (const char *const[]){ "", "store=fp16" }, 2, 0),
			 "spec 1 of 2 S1 \"\" (default)");
	/* the same spec twice: nothing sets it apart, so all of it */
	cr_assert_str_eq(ab_progress_spec_label(buf, sizeof(buf), (const char *const[]){ "a=1,b=2", "a=1,b=2" }, 2, 1),
			 "spec 2 of 2 S2 a=1,b=2");
}

/* The line: tokens done of all, the rate, an ETA, then the label; within the terminal's width, a long
 * label losing its middle but keeping its beginning (which spec) and its end (which chunk). */
Test(ab, progress_line_shows_tokens_eta_and_fits_the_terminal)
{
	struct ab_progress p;
	char line[2 * AB_PROGRESS_LABEL_MAX], label[400];
	int i;

	ab_progress_start(&p, 4000, 0);
	p.done = 1000;
	ab_progress_format(&p, p.start + 10.0, "spec 2 of 3 S2 policy=h2o(heavy=0.25,recent=0.25), chunk 1 of 8", 200,
			   line, sizeof(line));
	cr_assert_not_null(strstr(line, " 25% 1000/4000 tokens 100 tok/s ETA 0:30 spec 2 of 3 S2 "
				  "policy=h2o(heavy=0.25,recent=0.25), chunk 1 of 8"), "%s", line);
	snprintf(label, sizeof(label), "spec 7 of 40 S7 ");
	for (i = 0; i < 30; i++)
		strcat(label, "x=1,");
	strcat(label, " chunk 3 of 8");
	ab_progress_format(&p, p.start + 10.0, label, 100, line, sizeof(line));
	cr_assert_leq(strlen(line), 99, "%zu characters: %s", strlen(line), line);
	cr_assert_not_null(strstr(line, "ETA 0:30 spec 7 of 40 S7 x=1,"), "%s", line);
	cr_assert_not_null(strstr(line, "..."), "the middle left out: %s", line);
	cr_assert_eq(strcmp(line + strlen(line) - strlen(" chunk 3 of 8"), " chunk 3 of 8"), 0, "%s", line);
}

/* Runs cmd in a pseudo-terminal (script(1)), as a user at a terminal would; its output into out. */
static void run_in_terminal(const char *cmd, char *out, size_t cap)
{
	char line[8192];
	size_t n;
	FILE *f;

	if (system("command -v script >/dev/null 2>&1") != 0)
		cr_skip_test("script(1) is not installed (util-linux)");
	snprintf(line, sizeof(line), "script -qec \"%s\" /dev/null", cmd);
	f = popen(line, "r");
	cr_assert_not_null(f);
	n = fread(out, 1, cap - 1, f);
	out[n] = '\0';
	cr_assert_eq(pclose(f), 0, "%s: %s", cmd, out);
}

/* kvpager-calibrate on a terminal: tokens run of all and an ETA while it runs; --quiet: nothing. */
Test(ab, calibrate_shows_progress_on_a_terminal_unless_quiet)
{
	char out_file[256], cmd[2048], out[65536];
	const char *model = model_path("kjv-64.bin"), *text = model_path("kjv-heldout.txt");

	temp_path(out_file, sizeof(out_file), ".kvtria");
	/* drawn from the first token on: a fast machine runs these 1536 tokens in less than the second a
	 * user waits before the line appears */
	snprintf(cmd, sizeof(cmd), "KVP_PROGRESS_AFTER=0 %s --model %s --text %s --max-tokens 1536 --out %s",
		 tool_path("kvpager-calibrate"), model, text, out_file);
	run_in_terminal(cmd, out, sizeof(out));
	cr_assert_not_null(strstr(out, "/1536 tokens"), "progress: %s", out);
	cr_assert_not_null(strstr(out, "ETA "), "%s", out);
	cr_assert_not_null(strstr(out, "calibrating "), "%s", out);
	strcat(cmd, " --quiet");
	run_in_terminal(cmd, out, sizeof(out));
	cr_assert_null(strstr(out, "tokens"), "--quiet: %s", out);
	unlink(out_file);
}

/* kvpager-ab on a terminal: the progress line names the spec by what sets it apart; --quiet: nothing. */
Test(ab, progress_on_a_terminal_names_spec_i_of_n)
{
	char cmd[4096], out[65536];

	snprintf(cmd, sizeof(cmd), "COLUMNS=200 KVP_PROGRESS_AFTER=0 %s --model %s --text %s --ctx 256 --chunks 3 "
		 "--spec 'block=16,sinks=4,window=16,store=fp16,policy=streaming(sinks=4,window=60)' "
		 "--spec 'block=16,sinks=4,window=16,store=fp16,policy=h2o(heavy=0.1,recent=0.1)'",
		 tool_path("kvpager-ab"), model_path("kjv-64.bin"), model_path("kjv-heldout.txt"));
	run_in_terminal(cmd, out, sizeof(out));
	cr_assert_not_null(strstr(out, "/2304 tokens"), "tokens done of all: %s", out);
	cr_assert_not_null(strstr(out, "ETA "), "%s", out);
	cr_assert(strstr(out, "spec 1 of 2 S1 policy=streaming(sinks=4,window=60), chunk ") ||
		  strstr(out, "spec 2 of 2 S2 policy=h2o(heavy=0.1,recent=0.1), chunk "), "which spec: %s", out);
	cr_assert_null(strstr(out, "S1 block=16"), "not the prefix both specs share: %s", out);
	strcat(cmd, " --quiet");
	run_in_terminal(cmd, out, sizeof(out));
	cr_assert_null(strstr(out, " tokens "), "--quiet: %s", out);
}

/* ---- --prefix-share: prompts sharing their first 3/4 through the prefix cache ---- */

/* The unsigned number after what in out (the first occurrence). */
static unsigned long number_after(const char *out, const char *what)
{
	const char *at = strstr(out, what);

	cr_assert_not_null(at, "no '%s' in: %s", what, out);
	return strtoul(at + strlen(what), NULL, 10);
}

/* Four prompts of 128 tokens of kjv-heldout.txt share their first 96; with block=16 and the 4 sinks the
 * whole units inside those 96 tokens are 4 + 5 x 16 = 84 tokens, which every prompt after the first finds. */
Test(ab, prefix_share_hits_the_shared_units_and_generates_what_a_run_without_the_cache_does)
{
	char args[2048], out[16384];

	snprintf(args, sizeof(args), "--prefix-share --model %s --text %s --ctx 128 --prompts 4 --steps 16 "
		 "--spec 'block=16'", model_path("kjv-64.bin"), model_path("kjv-heldout.txt"));
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(number_after(out, "hit rate: "), 3 * 84, "%s", out);
	cr_assert_not_null(strstr(out, "hit rate: 252/512 prompt tokens (49.2%)"), "%s", out);
	cr_assert_eq(number_after(out, "prefill tokens saved: "), 3 * 84, "%s", out);
	cr_assert_eq(number_after(out, "prefix_hit_tokens "), 3 * 84, "the tenant's own count agrees: %s", out);
	cr_assert_not_null(strstr(out, "equal the run without the cache: 4 of 4 prompts"), "%s", out);
	cr_assert_not_null(strstr(out, "     1         0       128  yes"), "the first prompt finds nothing: %s", out);
}

/* The same prompts with a TurboQuant cold tier on fp16: the prompt's blocks are cached exact, so the
 * greedy tokens still equal the run without the cache; with prefix=off nothing is found. */
Test(ab, prefix_share_with_a_cold_tier_and_without_prefix_caching)
{
	char args[2048], out[16384];

	snprintf(args, sizeof(args), "--prefix-share --model %s --text %s --ctx 128 --prompts 3 --steps 24 "
		 "--spec 'block=16,window=16,store=fp16," TQ3 "'", model_path("kjv-64.bin"), model_path("kjv-heldout.txt"));
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_eq(number_after(out, "prefill tokens saved: "), 2 * 84, "%s", out);
	cr_assert_not_null(strstr(out, "3 of 3 prompts"), "%s", out);
	snprintf(args, sizeof(args), "--prefix-share --model %s --text %s --ctx 128 --prompts 3 --spec "
		 "'block=16,model=kjv,prefix=off'", model_path("kjv-64.bin"), model_path("kjv-heldout.txt"));
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 0, "%s", out);
	cr_assert_not_null(strstr(out, "hit rate: 0/384 prompt tokens (0.0%)"), "%s", out);
	cr_assert_eq(number_after(out, "prefill tokens saved: "), 0, "%s", out);
}

Test(ab, prefix_share_bad_inputs_exit_2)
{
	char args[2048], out[8192];
	const char *model = model_path("kjv-64.bin");

	snprintf(args, sizeof(args), "--prefix-share --model %s", model);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "one of --prompt TEXT and --text FILE"), "%s", out);
	snprintf(args, sizeof(args), "--prompts 3 --model %s", model);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "give --prefix-share"), "%s", out);
	snprintf(args, sizeof(args), "--prefix-share --model %s --text %s --ctx 500 --steps 20", model,
		 model_path("kjv-heldout.txt"));
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "context of 512"), "%s", out);
	snprintf(args, sizeof(args), "--prefix-share --model %s --prompt 'In the beginning' --spec '' --spec 'block=8'",
		 model);
	cr_assert_eq(run("kvpager-ab", args, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "one cache spec"), "%s", out);
}
