/*
 * Suite ab: kvpager-ab end to end — a real model (kjv-64) with the exact cache and a TurboQuant cold
 * tier, a trace recorded by kvpager-llama and replayed, the built-in synthetic trace, the CSV and the
 * SVG, and bad inputs (truncated traces and checkpoints, a wrong magic, unknown options and spec keys,
 * a policy spec the library may not serve yet), and --text: perplexity over kjv-heldout.txt against the
 * rule of llama.cpp's llama-perplexity computed here with the dense cache, and its bad inputs.
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
#include "tool_fixture.h"
#include "tools/llama.h"

#define TQ3 "k=turboquant(bits=3),v=turboquant(bits=3)"

enum column {
	COL_SPEC, COL_TOKENS, COL_BYTES_PER_TOKEN, COL_COMPRESSION, COL_KL_MEAN, COL_KL_P99, COL_TOP1,
	COL_ATTENTION_ERROR, COL_ATTENTION_ERROR_MAX, COL_TOKENS_PER_S, N_COLUMNS = 14
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
	static const char header[] = "spec,tokens,bytes_per_token,compression_vs_fp16,kl_mean,kl_p99,"
				     "top1_agreement,attention_rel_error,attention_rel_error_max,tokens_per_s,";
	char line[4096];
	FILE *f = fopen(path, "r");
	int n = 0;

	cr_assert_not_null(f, "%s", path);
	cr_assert_not_null(fgets(line, sizeof(line), f));
	cr_assert_eq(strncmp(line, header, strlen(header)), 0, "header: %s", line);
	while (n < cap && fgets(line, sizeof(line), f))
		parse_row(line, &rows[n++]);
	fclose(f);
	return n;
}

static void assert_exact_row(const struct row *r, int with_logits)
{
	cr_assert(r->value[COL_ATTENTION_ERROR] < 1e-5, "exact attention error %g", r->value[COL_ATTENTION_ERROR]);
	/* fp32 storage plus the block tables: a little over twice the dense fp16 bytes */
	cr_assert(r->value[COL_COMPRESSION] > 0.3 && r->value[COL_COMPRESSION] <= 0.5,
		  "exact compression %g", r->value[COL_COMPRESSION]);
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
	/* the axes multiply: the stacked spec holds fewer bytes than either part alone */
	cr_assert_lt(rows[6].value[COL_BYTES_PER_TOKEN], rows[5].value[COL_BYTES_PER_TOKEN]);
	cr_assert_lt(rows[6].value[COL_BYTES_PER_TOKEN], rows[2].value[COL_BYTES_PER_TOKEN]);
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
		cr_assert_lt(v[COL_BYTES_PER_TOKEN], rows[0].value[COL_BYTES_PER_TOKEN], "%s keeps fewer bytes", specs[i]);
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
	const char *line = strstr(out, label);
	double v;

	cr_assert_not_null(line, "no row '%s' in: %s", label, out);
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
	full = table_perplexity(out, "full cache (reference)");
	exact = table_perplexity(out, "\"\" (default)");
	tq = table_perplexity(out, TQ3);
	streaming = table_perplexity(out, "policy=streaming(sinks=4,window=60)");
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
