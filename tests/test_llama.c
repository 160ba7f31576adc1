/*
 * Suite llama: the llama2.c model code against the reference values of ../shared/models/README.md, the
 * kvpager plugin as its attention (in process through dlopen, and end to end through kvpager-llama), and
 * bad checkpoints and tokenizers.
 *
 * Models come from $KVP_MODELS (default ../shared/models, relative to the repository root, where make test
 * runs); the plugin and the tool from $KVP_TEST_BUILD (default build).
 */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvpager.h"
#include "tool_fixture.h"
#include "tools/llama.h"

#define TOL 1e-4
#define N_IDS 40

static const int stories_ids[N_IDS] = {
	403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
	410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
};
static const float stories_logits[4] = { -6.22291f, 8.40434f, -6.22374f, -6.22254f };
static const char stories_text[] =
	"Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
	"One day, she saw a big, r";

static const int kjv_ids[N_IDS] = {
	410, 447, 264, 265, 280, 415, 290, 418, 276, 416, 373, 359, 419, 420, 412, 411, 421, 432, 269, 265,
	262, 289, 419, 373, 410, 447, 423, 423, 289, 432, 269, 265, 262, 289, 419, 373, 410, 447, 423, 423,
};
static const float kjv_logits[5] = { -10.79626f, -2.38918f, -10.85568f, -10.63864f, -10.82080f };
static const char kjv_text[] = "And the children of Israel, and the sons of Ammon, and the sons of Amm";
static const char kjv_prompt[] = "And the LORD said unto Moses,";
static const char kjv_continuation[] =
	" What shall I beseech thee, and thou shalt not be ashamed.\nAnd the LORD said unto Moses, "
	"What shall thou say, I will send thee, and thy servants, and thy son, and thy servants, and thy s";

/* One loaded model with its tokenizer and activations. */
struct bench {
	struct llama_model model;
	struct llama_tokenizer tokenizer;
	struct llama_state state;
};

static void bench_open(struct bench *b, const char *model)
{
	char err[LLAMA_ERROR_MAX] = "";

	cr_assert_eq(llama_model_load(&b->model, model_path(model), err), LLAMA_OK, "%s", err);
	cr_assert_eq(llama_tokenizer_load(&b->tokenizer, model_path("tok512.bin"), b->model.config.vocab_size,
					  err), LLAMA_OK, "%s", err);
	cr_assert_eq(llama_state_init(&b->state, &b->model.config), LLAMA_OK);
}

static void bench_close(struct bench *b)
{
	llama_state_free(&b->state);
	llama_tokenizer_free(&b->tokenizer);
	llama_model_free(&b->model);
}

/*
 * Greedy decode from the prompt (BOS first): ids[] receives the n tokens chosen after the prompt,
 * logits0 (if set) the first n_logits logits of position 0, text (if set) the decoded continuation.
 */
static void greedy(struct bench *b, const struct llama_attention *att, const char *prompt, int n, int *ids,
		   float *logits0, int n_logits, char *text, size_t text_cap)
{
	int prompt_ids[256], n_prompt, pos, token, next, rc, got = 0;
	size_t len, used = 0;
	const char *piece;

	n_prompt = llama_encode(&b->tokenizer, prompt, 1, 0, prompt_ids);
	cr_assert(n_prompt > 0 && n_prompt + n <= b->model.config.seq_len);
	token = prompt_ids[0];
	for (pos = 0; got < n; pos++) {
		rc = llama_forward(&b->model, &b->state, att, NULL, token, pos);
		cr_assert_eq(rc, LLAMA_OK, "forward at position %d: %d", pos, rc);
		if (pos == 0 && logits0)
			memcpy(logits0, b->state.logits, sizeof(float) * (size_t)n_logits);
		if (pos + 1 < n_prompt) {
			next = prompt_ids[pos + 1];
		} else {
			next = llama_argmax(b->state.logits, b->model.config.vocab_size);
			ids[got++] = next;
			if (text) {
				piece = llama_decode(&b->tokenizer, token, next, &len);
				cr_assert_lt(used + len, text_cap);
				memcpy(text + used, piece, len);
				used += len;
			}
		}
		token = next;
	}
	if (text)
		text[used] = '\0';
}

static void assert_ids(const int *got, const int *want, int n, const char *what)
{
	int i;

	for (i = 0; i < n; i++)
		cr_assert_eq(got[i], want[i], "%s: id %d is %d, want %d", what, i, got[i], want[i]);
}

static void assert_close(const float *got, const float *want, int n, const char *what)
{
	int i;

	for (i = 0; i < n; i++)
		cr_assert(fabs((double)got[i] - (double)want[i]) <= TOL, "%s[%d] = %.6f, want %.5f (tol %g)",
			  what, i, (double)got[i], (double)want[i], TOL);
}

/* Runs model with the dense cache and checks logits at position 0, the first 40 ids and their text. */
static void check_dense(const char *model, const float *logits, int n_logits, const int *ids,
			const char *text)
{
	struct bench b;
	struct llama_dense_cache cache;
	struct llama_attention att;
	float got_logits[8];
	int got[N_IDS];
	char got_text[1024];

	bench_open(&b, model);
	cr_assert_eq(llama_dense_cache_init(&cache, &b.model.config), LLAMA_OK);
	att = llama_dense_attention(&cache);
	greedy(&b, &att, "", N_IDS, got, got_logits, n_logits, got_text, sizeof(got_text));
	assert_close(got_logits, logits, n_logits, "logits");
	assert_ids(got, ids, N_IDS, model);
	cr_assert_str_eq(got_text, text);
	llama_dense_cache_free(&cache);
	bench_close(&b);
}

Test(llama, stories260k_dense_reference)
{
	struct bench b;

	bench_open(&b, "stories260K.bin");
	cr_assert_eq(b.model.config.dim, 64);
	cr_assert_eq(b.model.config.head_size, 8);
	cr_assert_eq(b.model.config.kv_dim, 32);
	cr_assert(b.model.config.shared_classifier);
	cr_assert_eq(b.model.wcls, b.model.token_embedding);
	bench_close(&b);
	check_dense("stories260K.bin", stories_logits, 4, stories_ids, stories_text);
}

Test(llama, kjv64_dense_reference)
{
	check_dense("kjv-64.bin", kjv_logits, 5, kjv_ids, kjv_text);
}

Test(llama, kjv64_prompt_continuation)
{
	struct bench b;
	struct llama_dense_cache cache;
	struct llama_attention att;
	int got[100];
	char text[2048];

	bench_open(&b, "kjv-64.bin");
	cr_assert_eq(llama_dense_cache_init(&cache, &b.model.config), LLAMA_OK);
	att = llama_dense_attention(&cache);
	greedy(&b, &att, kjv_prompt, 100, got, NULL, 0, text, sizeof(text));
	cr_assert_str_eq(text, kjv_continuation);
	llama_dense_cache_free(&cache);
	bench_close(&b);
}

/* Records the post-RoPE key of (layer 0, pos 1) and the value of (layer 4, pos 5), and checks that the
 * query tap before RoPE differs from the one after it except at position 0. */
struct taps {
	float key[8], value[8];
	int seen_key, seen_value, rope_moved, rope_still;
	float q_pre[256];
};

static void record_tap(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct taps *t = ctx;
	int i, same = 1;

	if (tap == LLAMA_TAP_K && layer == 0 && pos == 1) {
		memcpy(t->key, x, sizeof(t->key));
		t->seen_key++;
	}
	if (tap == LLAMA_TAP_V && layer == 4 && pos == 5) {
		memcpy(t->value, x, sizeof(t->value));
		t->seen_value++;
	}
	if (tap == LLAMA_TAP_Q_PRE_ROPE)
		memcpy(t->q_pre, x, sizeof(float) * (size_t)n);
	if (tap == LLAMA_TAP_Q) {
		for (i = 0; i < n; i++)
			same &= t->q_pre[i] == x[i];
		if (pos == 0)
			t->rope_still += same;
		else
			t->rope_moved += !same;
	}
}

Test(llama, stories260k_cache_values_through_observer)
{
	static const float key[8] = {
		0.30446f, 0.27372f, 0.58243f, -0.53877f, -1.45711f, -2.08113f, 6.71899f, 0.54370f,
	};
	static const float value[8] = {
		0.47879f, -0.14877f, -0.04354f, 0.91079f, 0.74682f, -0.51927f, 0.09072f, -0.30826f,
	};
	struct taps taps = { 0 };
	struct llama_observer observer = { &taps, record_tap };
	struct llama_dense_cache cache;
	struct llama_attention att;
	struct bench b;
	int pos, token = LLAMA_TOKEN_BOS;

	bench_open(&b, "stories260K.bin");
	cr_assert_eq(llama_dense_cache_init(&cache, &b.model.config), LLAMA_OK);
	att = llama_dense_attention(&cache);
	for (pos = 0; pos < 6; pos++) {
		cr_assert_eq(llama_forward(&b.model, &b.state, &att, &observer, token, pos), LLAMA_OK);
		token = llama_argmax(b.state.logits, b.model.config.vocab_size);
	}
	cr_assert_eq(taps.seen_key, 1);
	cr_assert_eq(taps.seen_value, 1);
	assert_close(taps.key, key, 8, "key l0 p1");
	assert_close(taps.value, value, 8, "value l4 p5");
	/* the cache holds what the observer saw */
	assert_close(cache.keys + 1 * b.model.config.kv_dim, key, 8, "cache key");
	cr_assert_eq(taps.rope_still, 5, "RoPE at position 0 is the identity in all 5 layers");
	cr_assert_eq(taps.rope_moved, 25, "RoPE moves q at positions 1..5 in all 5 layers");
	llama_dense_cache_free(&cache);
	bench_close(&b);
}

Test(llama, encode_decode_round_trip)
{
	static const char *texts[] = { "And the LORD said unto Moses,", "Lily's mom said, \"Don't worry.\"",
				       "caf\xc3\xa9 \xe2\x98\x83 tab\there\n", "x" };
	struct bench b;
	int ids[256], n, i, j, bytes;
	char out[512];
	size_t len, used;
	const char *piece;

	bench_open(&b, "stories260K.bin");
	n = llama_encode(&b.tokenizer, "", 1, 1, ids);
	cr_assert_eq(n, 2, "empty text is BOS EOS without the dummy prefix");
	for (i = 0; i < (int)(sizeof(texts) / sizeof(texts[0])); i++) {
		n = llama_encode(&b.tokenizer, texts[i], 1, 0, ids);
		cr_assert_eq(ids[0], LLAMA_TOKEN_BOS);
		used = 0;
		bytes = 0;
		for (j = 1; j < n; j++) {
			piece = llama_decode(&b.tokenizer, ids[j - 1], ids[j], &len);
			memcpy(out + used, piece, len);
			used += len;
			bytes += ids[j] >= LLAMA_TOKEN_BYTE0 && ids[j] < LLAMA_TOKEN_BYTE0 + 256;
		}
		out[used] = '\0';
		cr_assert_str_eq(out, texts[i]);
		/* é and the snowman are not in the 512 vocabulary: 2 + 3 byte-fallback ids */
		if (i == 2)
			cr_assert_geq(bytes, 5, "byte fallback used %d ids", bytes);
	}
	/* merges happened: 29 characters do not take 29 ids */
	n = llama_encode(&b.tokenizer, texts[0], 1, 0, ids);
	cr_assert_lt(n, 20);
	bench_close(&b);
}

/* The merge rule written out the slow way: rescan every adjacent pair, merge the best, leftmost on ties. */
static int encode_by_rescan(const struct llama_tokenizer *t, const char *text, int *ids)
{
	int n = llama_encode(t, "", 0, 0, ids), best, i, id, best_id = -1;
	char joined[64];

	ids[n++] = llama_tokenizer_find(t, " ", 1);
	for (; *text; text++) /* ASCII only here: one id per byte */
		ids[n++] = llama_tokenizer_find(t, text, 1);
	for (;;) {
		best = -1;
		for (i = 0; i + 1 < n; i++) {
			snprintf(joined, sizeof joined, "%s%s", t->pieces[ids[i]], t->pieces[ids[i + 1]]);
			id = llama_tokenizer_find(t, joined, strlen(joined));
			if (id >= 0 && (best < 0 || t->scores[id] > t->scores[best_id])) {
				best = i;
				best_id = id;
			}
		}
		if (best < 0)
			return n;
		ids[best] = best_id;
		memmove(&ids[best + 1], &ids[best + 2], sizeof(int) * (size_t)(n - best - 2));
		n--;
	}
}

Test(llama, encode_merges_like_a_rescan_of_every_pair)
{
	static const char alphabet[] = "  aeehinorsttd,.LORDAM";
	struct bench b;
	int fast[300], slow[300], n, i, j, len;
	uint64_t seed = 7;
	char text[200];

	bench_open(&b, "kjv-64.bin");
	for (i = 0; i < 300; i++) {
		len = 1 + (int)(llama_random_u32(&seed) % 150);
		for (j = 0; j < len; j++)
			text[j] = alphabet[llama_random_u32(&seed) % (sizeof(alphabet) - 1)];
		text[len] = '\0';
		n = llama_encode(&b.tokenizer, text, 0, 0, fast);
		cr_assert_eq(n, encode_by_rescan(&b.tokenizer, text, slow), "'%s'", text);
		cr_assert_arr_eq(fast, slow, sizeof(int) * (size_t)n, "'%s'", text);
	}
	bench_close(&b);
}

/* kjv-heldout.txt, 108 KB, as the models README counts it. A rescan per merge took 16 s here and the merge
 * queue takes about 0.1 s: the timeout fails the quadratic way without timing the fast one. */
Test(llama, encode_whole_file_to_its_token_count, .timeout = 10)
{
	struct bench b;
	FILE *f = fopen(model_path("kjv-heldout.txt"), "rb");
	char *text = malloc(200000);
	int *ids = malloc(sizeof(int) * 200003);
	size_t n;

	cr_assert(f && text && ids);
	n = fread(text, 1, 199999, f);
	fclose(f);
	text[n] = '\0';
	bench_open(&b, "kjv-64.bin");
	cr_assert_eq(llama_encode(&b.tokenizer, text, 0, 0, ids), 58875);
	bench_close(&b);
	free(text);
	free(ids);
}

/* ---- the plugin as attention, in this process ---- */

struct plugin {
	void *library;
	const kvp_plugin_v1 *api;
};

static void plugin_load(struct plugin *p)
{
	const char *path = build_path("libkvpager.so.1");
	const kvp_plugin_v1 *(*entry)(uint32_t);

	p->library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	cr_assert_not_null(p->library, "dlopen %s: %s", path, dlerror());
	entry = (const kvp_plugin_v1 *(*)(uint32_t))dlsym(p->library, "kvp_plugin");
	cr_assert_not_null(entry, "%s has no kvp_plugin", path);
	cr_assert_null(entry(KVP_ABI_MAJOR + 1), "a future major must be refused");
	p->api = entry(KVP_ABI_MAJOR);
	cr_assert_not_null(p->api);
	cr_assert_eq(p->api->abi_major, KVP_ABI_MAJOR);
	cr_assert_geq(p->api->size, sizeof(kvp_plugin_v1));
}

static void check_plugin(const char *model, const float *logits, int n_logits, const int *ids)
{
	struct plugin p;
	struct llama_plugin_cache cache;
	struct llama_attention att;
	struct bench b;
	float got_logits[8];
	int got[N_IDS];
	kvp_stats st = { .size = sizeof(st) };

	plugin_load(&p);
	bench_open(&b, model);
	cr_assert_eq(llama_plugin_cache_open(&cache, p.api, &b.model.config, "", ""), LLAMA_OK, "%s",
		     cache.message);
	att = llama_plugin_attention(&cache);
	greedy(&b, &att, "", N_IDS, got, got_logits, n_logits, NULL, 0);
	assert_close(got_logits, logits, n_logits, "plugin logits");
	assert_ids(got, ids, N_IDS, model);
	cr_assert_eq(p.api->seq_stats(cache.seq, &st), KVP_OK);
	cr_assert_eq(st.tokens_appended,
		     (uint64_t)N_IDS * (uint64_t)(b.model.config.n_layers * b.model.config.n_kv_heads),
		     "one token per step per stream");
	llama_plugin_cache_close(&cache);
	bench_close(&b);
	dlclose(p.library);
}

Test(llama, stories260k_through_plugin)
{
	check_plugin("stories260K.bin", stories_logits, 4, stories_ids);
}

Test(llama, kjv64_through_plugin)
{
	check_plugin("kjv-64.bin", kjv_logits, 5, kjv_ids);
}

Test(llama, plugin_rejects_bad_cache_spec)
{
	struct plugin p;
	struct llama_plugin_cache cache;
	struct bench b;

	plugin_load(&p);
	bench_open(&b, "stories260K.bin");
	cr_assert_eq(llama_plugin_cache_open(&cache, p.api, &b.model.config, "", "no_such_key=1"),
		     LLAMA_EINPUT);
	cr_assert_eq(cache.status, KVP_EINVAL);
	cr_assert_not_null(strstr(cache.message, "no_such_key"), "message: %s", cache.message);
	cr_assert_null(cache.pool, "nothing is left open");
	bench_close(&b);
	dlclose(p.library);
}

/* ---- the tool, end to end ---- */

/* Runs kvpager-llama quietly with args; stdout (and stderr when merge) into out. Returns the exit status.
 * Skips when this build has no tool (the sanitizer build). */
static int run_llama(const char *args, int merge, char *out, size_t cap)
{
	char quiet[4096];

	snprintf(quiet, sizeof quiet, "--quiet %s", args);
	return run_tool("kvpager-llama", quiet, merge, out, cap);
}

static void parse_ids(const char *line, int *ids, int n)
{
	char *end;
	int i;

	for (i = 0; i < n; i++) {
		ids[i] = (int)strtol(line, &end, 10);
		cr_assert_neq(end, line, "fewer than %d ids in '%s'", n, line);
		line = end;
	}
}

/* Position 0 logits and 40 greedy ids from the tool's output, with the dense cache or the plugin. */
static void check_tool(const char *model, const char *mode, const float *logits, int n_logits, const int *ids)
{
	char args[1024], out[8192], *nl, *s;
	float got_logits[8];
	int got[N_IDS], i;

	snprintf(args, sizeof(args), "--model %s %s --print-ids --steps %d --temp 0 --print-logits %d",
		 model_path(model), mode, N_IDS, n_logits);
	cr_assert_eq(run_llama(args, 0, out, sizeof(out)), 0, "output: %s", out);
	nl = strchr(out, '\n');
	cr_assert_not_null(nl, "no logits line: %s", out);
	s = out;
	for (i = 0; i < n_logits; i++)
		got_logits[i] = strtof(s, &s);
	cr_assert_eq(s, nl, "%d logits on the first line: %s", n_logits, out);
	assert_close(got_logits, logits, n_logits, "tool logits");
	parse_ids(nl + 1, got, N_IDS);
	assert_ids(got, ids, N_IDS, "tool");
}

Test(llama, tool_stories260k_end_to_end)
{
	check_tool("stories260K.bin", "--dense", stories_logits, 4, stories_ids);
	check_tool("stories260K.bin", "", stories_logits, 4, stories_ids);
}

Test(llama, tool_kjv64_end_to_end)
{
	check_tool("kjv-64.bin", "--dense", kjv_logits, 5, kjv_ids);
	check_tool("kjv-64.bin", "", kjv_logits, 5, kjv_ids);
}

Test(llama, tool_prompt_text_dense_and_plugin_agree)
{
	char args[1024], dense[4096], plugin[4096];
	char want[1024];

	/* the prompt takes 18 positions and the last of them yields the first of the 100 tokens: 117 */
	snprintf(args, sizeof(args), "--model %s --prompt '%s' --steps 117 --dense", model_path("kjv-64.bin"),
		 kjv_prompt);
	cr_assert_eq(run_llama(args, 0, dense, sizeof(dense)), 0);
	snprintf(want, sizeof(want), "%s%s\n", kjv_prompt, kjv_continuation);
	cr_assert_str_eq(dense, want);
	snprintf(args, sizeof(args), "--model %s --prompt '%s' --steps 117", model_path("kjv-64.bin"),
		 kjv_prompt);
	cr_assert_eq(run_llama(args, 0, plugin, sizeof(plugin)), 0);
	cr_assert_str_eq(plugin, want);
}

/* ---- bad inputs ---- */

/* Copies the first n bytes of src into a new temporary file; returns its path (static buffer). */
static const char *truncated_copy(const char *src, long n, char *path, size_t cap)
{
	FILE *in = fopen(src, "rb"), *out;
	char buf[4096];
	size_t got;
	int fd;

	cr_assert_not_null(in, "%s", src);
	snprintf(path, cap, "/tmp/kvp_test_llama_XXXXXX");
	fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	out = fdopen(fd, "wb");
	cr_assert_not_null(out);
	while (n > 0 && (got = fread(buf, 1, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf), in)) > 0) {
		fwrite(buf, 1, got, out);
		n -= (long)got;
	}
	fclose(in);
	fclose(out);
	return path;
}

static void expect_model_error(const char *path, const char *words)
{
	struct llama_model m;
	char err[LLAMA_ERROR_MAX] = "";

	cr_assert_eq(llama_model_load(&m, path, err), LLAMA_EINPUT, "%s loaded", path);
	cr_assert_not_null(strstr(err, path), "message names the file: %s", err);
	cr_assert_not_null(strstr(err, words), "message says '%s': %s", words, err);
	cr_assert_null(m.data);
}

Test(llama, bad_checkpoints)
{
	char tmp[64];
	int32_t header[7] = { 64, 172, 5, 8, 4, 512, 512 };
	FILE *f;

	expect_model_error("/nonexistent/stories260K.bin", "cannot open");
	truncated_copy(model_path("stories260K.bin"), 1056540 - 4, tmp, sizeof(tmp));
	expect_model_error(tmp, "truncated");
	unlink(tmp);
	truncated_copy(model_path("stories260K.bin"), 20, tmp, sizeof(tmp));
	expect_model_error(tmp, "too short");
	unlink(tmp);
	/* absurd headers: dim not divisible by n_heads, n_heads by n_kv_heads, a zero, and a huge size */
	truncated_copy(model_path("stories260K.bin"), 0, tmp, sizeof(tmp));
	f = fopen(tmp, "wb");
	header[3] = 7;
	fwrite(header, sizeof(header), 1, f);
	fclose(f);
	expect_model_error(tmp, "not a multiple of n_heads");
	f = fopen(tmp, "wb");
	header[3] = 8;
	header[4] = 3;
	fwrite(header, sizeof(header), 1, f);
	fclose(f);
	expect_model_error(tmp, "not a multiple of n_kv_heads");
	f = fopen(tmp, "wb");
	header[4] = 4;
	header[2] = 0;
	fwrite(header, sizeof(header), 1, f);
	fclose(f);
	expect_model_error(tmp, "not positive");
	f = fopen(tmp, "wb");
	header[2] = 0x7fffffff;
	header[0] = header[1] = 0x40000000;
	fwrite(header, sizeof(header), 1, f);
	fclose(f);
	expect_model_error(tmp, "too large");
	unlink(tmp);
}

Test(llama, bad_tokenizers)
{
	struct llama_tokenizer t;
	char err[LLAMA_ERROR_MAX] = "", tmp[64];

	cr_assert_eq(llama_tokenizer_load(&t, "/nonexistent/tok512.bin", 512, err), LLAMA_EINPUT);
	cr_assert_not_null(strstr(err, "/nonexistent/tok512.bin"), "%s", err);
	truncated_copy(model_path("tok512.bin"), 6227 - 3, tmp, sizeof(tmp));
	cr_assert_eq(llama_tokenizer_load(&t, tmp, 512, err), LLAMA_EINPUT);
	cr_assert_not_null(strstr(err, tmp), "%s", err);
	cr_assert_not_null(strstr(err, "truncated"), "%s", err);
	cr_assert_null(t.pieces);
	unlink(tmp);
	/* the 32000-token tokenizer is not the 512-token model's */
	cr_assert_eq(llama_tokenizer_load(&t, model_path("tokenizer.bin"), 512, err), LLAMA_EINPUT);
	cr_assert_not_null(strstr(err, "wrong tokenizer"), "%s", err);
	cr_assert_eq(llama_tokenizer_load(&t, model_path("tok512.bin"), 512, err), LLAMA_OK, "%s", err);
	cr_assert_eq(t.max_token_length, 7);
	cr_assert_str_eq(t.pieces[LLAMA_TOKEN_BOS], "\n<s>\n");
	llama_tokenizer_free(&t);
}

Test(llama, tool_bad_inputs_exit_2)
{
	char tmp[64], args[1024], out[4096];

	tool_path("kvpager-llama");
	truncated_copy(model_path("stories260K.bin"), 100000, tmp, sizeof(tmp));
	snprintf(args, sizeof(args), "--dense --model %s --tokenizer %s", tmp, model_path("tok512.bin"));
	cr_assert_eq(run_llama(args, 1, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "truncated"), "%s", out);
	unlink(tmp);
	cr_assert_eq(run_llama("--dense --model /nonexistent/m.bin", 1, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "/nonexistent/m.bin"), "%s", out);
	truncated_copy(model_path("tok512.bin"), 3000, tmp, sizeof(tmp));
	snprintf(args, sizeof(args), "--dense --model %s --tokenizer %s", model_path("stories260K.bin"), tmp);
	cr_assert_eq(run_llama(args, 1, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "truncated"), "%s", out);
	unlink(tmp);
	cr_assert_eq(run_llama("--steps zero", 1, out, sizeof(out)), 2, "%s", out);
	snprintf(args, sizeof(args), "--model %s --cache no_such_key=1", model_path("stories260K.bin"));
	cr_assert_eq(run_llama(args, 1, out, sizeof(out)), 2, "%s", out);
	cr_assert_not_null(strstr(out, "no_such_key"), "the library's message is shown: %s", out);
}
