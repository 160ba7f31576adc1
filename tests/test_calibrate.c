/*
 * kvpager-calibrate on the real model (../shared/models/stories260K.bin): the file it writes is accepted
 * by the reader and by triattention(stats=FILE), its statistics are finite and agree with the online
 * estimate from the same run's post-RoPE queries, and bad inputs exit with status 2 and a message.
 */
#include <criterion/criterion.h>
#include <sys/wait.h>

#include "policy_fixture.h"
#include "tool_fixture.h"
#include "tools/llama.h"

/* Runs the calibrator with args; its stderr lands in out. Returns the exit status. Skips when this build
 * has no tools (the sanitizer build makes only the tests). */
static int calibrate(const char *args, char *out, size_t cap)
{
	return run_tool("kvpager-calibrate", args, 1, out, cap);
}

static void load_model(struct llama_model *m)
{
	char err[LLAMA_ERROR_MAX] = "";
	cr_assert_eq(llama_model_load(m, model_path("stories260K.bin"), err), LLAMA_OK, "%s", err);
}

Test(calibrate, stories260k_statistics_are_accepted_and_finite)
{
	const char *out = fixture_path("stories.kvtria");
	char args[2048], msg[4096];
	struct llama_model m;
	struct kvp_tria_stats st;
	kvp_shape shape;
	double mrl_sum = 0;
	size_t n;

	load_model(&m);
	shape = llama_model_shape(&m.config);
	snprintf(args, sizeof args, "--model %s --out %s --steps 256", model_path("stories260K.bin"), out);
	cr_assert_eq(calibrate(args, msg, sizeof msg), 0, "%s", msg);
	cr_assert(strstr(msg, "256 positions"), "%s", msg);
	cr_assert_eq(kvp_tria_stats_read(out, &shape, &st), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(st.n_layers, 5);
	cr_assert_eq(st.n_heads, 8);
	cr_assert_eq(st.head_dim, 8);
	cr_assert_eq(st.rope_layout, KVP_ROPE_INTERLEAVED);
	n = (size_t)st.n_layers * st.n_heads * st.head_dim / 2;
	for (size_t i = 0; i < n; i++) {
		cr_assert(isfinite(st.mean_re[i]) && isfinite(st.mean_im[i]) && isfinite(st.abs_mean[i]));
		cr_assert_gt(st.abs_mean[i], 0.0f, "band %zu never moved", i);
		cr_assert_leq(hypotf(st.mean_re[i], st.mean_im[i]), st.abs_mean[i] * 1.0001f);
	}
	for (uint32_t l = 0; l < 5; l++)
		for (uint32_t h = 0; h < 4; h++) {
			double r = kvp_gate_mrl(&st, l, h, 4);
			cr_assert(r > 0.05 && r < 1.0, "layer %u KV head %u: mean resultant length %g", l, h, r);
			mrl_sum += r;
		}
	kvp_tria_stats_free(&st);
	{
		char spec[1200];
		kvp_policy *p = NULL;
		snprintf(spec, sizeof spec, "triattention(budget=128,stats=%s)", out);
		cr_assert_eq(kvp_policy_open(spec, &shape, &p), KVP_OK, "%s", kvp_last_error());
		kvp_policy_close(p);
	}
	cr_log_info("stories260K: mean resultant length over KV heads %.3f", mrl_sum / 20);
	unlink(out);
	llama_model_free(&m);
}

/* Feeds every position's post-RoPE queries to an online policy while the model runs. */
struct online_feed {
	kvp_policy *p;
	kvp_shape shape;
};

static void feed(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n)
{
	struct online_feed *f = ctx;
	unsigned group = f->shape.n_heads / f->shape.n_kv_heads;

	(void)n;
	if (tap != LLAMA_TAP_Q)
		return;
	for (uint32_t g = 0; g < f->shape.n_kv_heads; g++)
		cr_assert_eq(kvp_policy_observe(f->p, (uint32_t)layer, g, pos, x + (size_t)g * group * f->shape.head_dim,
						0, NULL, NULL), KVP_OK, "%s", kvp_last_error());
}

/* The calibrator averages pre-RoPE queries; stats=online rotates post-RoPE ones back: same numbers. */
Test(calibrate, online_statistics_match_the_calibrated_file_on_the_same_run)
{
	const char *out = fixture_path("online.kvtria");
	char args[2048], msg[4096], spec[1200];
	struct llama_model m;
	struct llama_tokenizer tok;
	struct llama_state state;
	struct llama_dense_cache cache;
	struct llama_attention att;
	struct online_feed f;
	struct llama_observer obs = { .ctx = &f, .observe = feed };
	char err[LLAMA_ERROR_MAX] = "";
	int ids[64], n_ids, token;
	kvp_policy *file = NULL;
	float k[8][8], a[8], b[8];
	unsigned seed = 2;

	load_model(&m);
	cr_assert_eq(llama_tokenizer_load(&tok, model_path("tok512.bin"), m.config.vocab_size, err), LLAMA_OK, "%s", err);
	cr_assert_eq(llama_state_init(&state, &m.config), LLAMA_OK);
	cr_assert_eq(llama_dense_cache_init(&cache, &m.config), LLAMA_OK);
	f.shape = llama_model_shape(&m.config);
	cr_assert_eq(kvp_policy_open("triattention(stats=online)", &f.shape, &f.p), KVP_OK, "%s", kvp_last_error());
	snprintf(args, sizeof args, "--model %s --out %s --steps 200 --prompt 'Once upon a time'",
		 model_path("stories260K.bin"), out);
	cr_assert_eq(calibrate(args, msg, sizeof msg), 0, "%s", msg);
	/* the same run: prompt, then greedy, 200 positions */
	n_ids = llama_encode(&tok, "Once upon a time", 1, 0, ids);
	att = llama_dense_attention(&cache);
	token = ids[0];
	for (int pos = 0; pos < 200; pos++) {
		cr_assert_eq(llama_forward(&m, &state, &att, &obs, token, pos), LLAMA_OK);
		token = pos + 1 < n_ids ? ids[pos + 1] : llama_argmax(state.logits, m.config.vocab_size);
	}
	snprintf(spec, sizeof spec, "triattention(stats=%s)", out);
	cr_assert_eq(kvp_policy_open(spec, &f.shape, &file), KVP_OK, "%s", kvp_last_error());
	for (int i = 0; i < 8; i++) {
		for (int j = 0; j < 8; j++)
			k[i][j] = (float)(rand_r(&seed) % 200) / 100.0f - 1.0f;
		fixture_rope(k[i], 8, 10000.0, KVP_ROPE_INTERLEAVED, 150 + i);
	}
	for (uint32_t l = 0; l < 5; l++)
		for (uint32_t h = 0; h < 8; h++) {
			cr_assert_eq(kvp_tria_raw_scores(f.p, l, h, 200, 8, &k[0][0], a), KVP_OK);
			cr_assert_eq(kvp_tria_raw_scores(file, l, h, 200, 8, &k[0][0], b), KVP_OK);
			for (int i = 0; i < 8; i++)
				cr_assert_float_eq(a[i], b[i], 1e-3 * (1 + fabsf(b[i])),
						   "layer %u head %u key %d: online %.5f, file %.5f", l, h, i, a[i], b[i]);
		}
	kvp_policy_close(file);
	kvp_policy_close(f.p);
	unlink(out);
	llama_dense_cache_free(&cache);
	llama_state_free(&state);
	llama_tokenizer_free(&tok);
	llama_model_free(&m);
}

static void expect_bad_input(const char *args, const char *words)
{
	char msg[4096];

	cr_assert_eq(calibrate(args, msg, sizeof msg), 2, "%s: %s", args, msg);
	cr_assert(strstr(msg, words), "%s: message lacks '%s': %s", args, words, msg);
}

Test(calibrate, bad_inputs_exit_2_with_a_message)
{
	const char *trunc = fixture_path("trunc.bin"), *empty = fixture_path("empty.txt");
	char args[2048], cmd[2048];

	snprintf(cmd, sizeof cmd, "head -c 100000 %s > %s && : > %s", model_path("stories260K.bin"), trunc, empty);
	cr_assert_eq(system(cmd), 0);
	snprintf(args, sizeof args, "--model %s --tokenizer %s --out /tmp/kvp-never.kvtria", trunc,
		 model_path("tok512.bin"));
	expect_bad_input(args, "truncated");
	expect_bad_input("", "--out");
	snprintf(args, sizeof args, "--model %s --out /tmp/kvp-never.kvtria --text %s", model_path("stories260K.bin"), empty);
	expect_bad_input(args, "empty");
	snprintf(args, sizeof args, "--model %s --out /nonexistent-dir/x.kvtria --steps 4", model_path("stories260K.bin"));
	expect_bad_input(args, "cannot write");
	expect_bad_input("--out /tmp/kvp-never.kvtria --steps -3", "--steps");
	expect_bad_input("--out /tmp/kvp-never.kvtria --text a --prompt b", "not both");
	expect_bad_input("--out /tmp/kvp-never.kvtria --colour red", "unknown option");
	unlink(trunc);
	unlink(empty);
	cr_assert(access("/tmp/kvp-never.kvtria", F_OK) != 0, "nothing written on bad input");
}
