/* The .kvtria statistics file: round trip, and every kind of bad file refused with a message naming it. */
#include <criterion/criterion.h>

#include "policy_fixture.h"

/* 2 layers x 4 heads x head_dim 8: 40 + 2*4*3*4*4 = 424 bytes. */
static kvp_shape small_shape(void)
{
	return fixture_shape(2, 4, 2, 8, 10000.0f, KVP_ROPE_INTERLEAVED);
}

/* One function makes the written and the expected values, so no compiler folds them differently
 * (clang contracts a constant a * i + b into one rounding, the runtime path rounds twice). */
__attribute__((noinline)) static float value(float a, unsigned i, float b)
{
	volatile float x = a * (float)i;
	return x + b;
}

static const char *write_valid(const char *name)
{
	kvp_shape s = small_shape();
	struct kvp_tria_stats st;
	const char *path = fixture_path(name);
	size_t n = (size_t)s.n_layers * s.n_heads * s.head_dim / 2;

	cr_assert_eq(kvp_tria_stats_alloc(&st, s.n_layers, s.n_heads, s.head_dim, s.rope_layout, s.rope_theta), KVP_OK);
	for (size_t i = 0; i < n; i++) {
		st.mean_re[i] = value(0.01f, i, 0.0f);
		st.mean_im[i] = value(-0.02f, i, 0.0f);
		st.abs_mean[i] = value(0.05f, i, 0.5f);
	}
	cr_assert_eq(kvp_tria_stats_write(path, &st), KVP_OK, "%s", kvp_last_error());
	kvp_tria_stats_free(&st);
	return path;
}

static long file_size(const char *path)
{
	FILE *f = fopen(path, "rb");
	long n;
	cr_assert_not_null(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fclose(f);
	return n;
}

/* Overwrites 4 bytes at offset with v (little endian) */
static void poke_u32(const char *path, long offset, uint32_t v)
{
	FILE *f = fopen(path, "r+b");
	unsigned char b[4] = { (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24) };
	cr_assert_not_null(f);
	fseek(f, offset, SEEK_SET);
	cr_assert_eq(fwrite(b, 1, 4, f), 4);
	fclose(f);
}

static void poke_f32(const char *path, long offset, float x)
{
	uint32_t u;
	memcpy(&u, &x, 4);
	poke_u32(path, offset, u);
}

static void expect_refused(const char *path, const kvp_shape *shape, kvp_status want, const char *words)
{
	struct kvp_tria_stats st = { 0 };

	cr_assert_eq(kvp_tria_stats_read(path, shape, &st), want, "%s: %s", words, kvp_last_error());
	cr_assert(strstr(kvp_last_error(), path), "message does not name the file: %s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), words), "message lacks '%s': %s", words, kvp_last_error());
	cr_assert_null(st.mean_re);
	unlink(path);
}

Test(kvtria, a_written_file_reads_back_bit_for_bit)
{
	kvp_shape s = small_shape();
	const char *path = write_valid("ok.kvtria");
	struct kvp_tria_stats st;

	cr_assert_eq(file_size(path), 424);
	cr_assert_eq(kvp_tria_stats_read(path, &s, &st), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(st.n_layers, 2);
	cr_assert_eq(st.n_heads, 4);
	cr_assert_eq(st.head_dim, 8);
	cr_assert_eq(st.rope_layout, KVP_ROPE_INTERLEAVED);
	cr_assert_float_eq(st.rope_theta, 10000.0f, 0);
	cr_assert_float_eq(st.mean_re[kvp_tria_stats_at(&st, 1, 2) + 3], value(0.01f, 27, 0.0f), 0);
	cr_assert_float_eq(st.mean_im[31], value(-0.02f, 31, 0.0f), 0);
	cr_assert_float_eq(st.abs_mean[31], value(0.05f, 31, 0.5f), 0);
	kvp_tria_stats_free(&st);
	/* the layout may differ from the model's: the statistics are indexed by band */
	s.rope_layout = KVP_ROPE_HALF;
	cr_assert_eq(kvp_tria_stats_read(path, &s, &st), KVP_OK, "%s", kvp_last_error());
	kvp_tria_stats_free(&st);
	unlink(path);
}

Test(kvtria, wrong_magic_is_refused)
{
	const char *path = write_valid("magic.kvtria");
	poke_u32(path, 4, 0x32304c4b); /* "KVTRKL02" */
	expect_refused(path, NULL, KVP_ECORRUPT, "wrong magic");
}

Test(kvtria, truncated_files_are_refused)
{
	const char *path = write_valid("trunc.kvtria");
	cr_assert_eq(truncate(path, 423), 0);
	expect_refused(path, NULL, KVP_ECORRUPT, "truncated");
	path = write_valid("trunc2.kvtria");
	cr_assert_eq(truncate(path, 20), 0);
	expect_refused(path, NULL, KVP_ECORRUPT, "header");
	path = write_valid("empty.kvtria");
	cr_assert_eq(truncate(path, 0), 0);
	expect_refused(path, NULL, KVP_ECORRUPT, "header");
}

Test(kvtria, trailing_bytes_are_refused)
{
	const char *path = write_valid("trail.kvtria");
	cr_assert_eq(truncate(path, 428), 0);
	expect_refused(path, NULL, KVP_ECORRUPT, "trailing");
}

Test(kvtria, impossible_headers_are_refused)
{
	const char *path = write_valid("odd.kvtria");
	poke_u32(path, 16, 7);
	expect_refused(path, NULL, KVP_ECORRUPT, "head_dim 7");
	path = write_valid("layout.kvtria");
	poke_u32(path, 20, 2);
	expect_refused(path, NULL, KVP_ECORRUPT, "rope_layout 2");
	path = write_valid("theta.kvtria");
	poke_f32(path, 24, NAN);
	expect_refused(path, NULL, KVP_ECORRUPT, "rope_theta");
	path = write_valid("huge.kvtria");
	poke_u32(path, 8, 0xffffffffu);
	expect_refused(path, NULL, KVP_ECORRUPT, "layers");
}

Test(kvtria, bad_values_are_refused_with_their_place)
{
	/* layer 1 head 3 starts at 40 + 7 * 48; its q_abs_mean band 2 at +32 */
	const char *path = write_valid("nan.kvtria");
	poke_f32(path, 40 + 7 * 48 + 4, NAN);
	expect_refused(path, NULL, KVP_ECORRUPT, "layer 1 head 3 band 1");
	path = write_valid("neg.kvtria");
	poke_f32(path, 40 + 7 * 48 + 32 + 8, -1.0f);
	expect_refused(path, NULL, KVP_ECORRUPT, "negative");
	path = write_valid("mrl.kvtria");
	poke_f32(path, 40, 5.0f); /* |q_mean| 5 > q_abs_mean 0.5 */
	expect_refused(path, NULL, KVP_ECORRUPT, "exceeds");
}

Test(kvtria, a_file_for_another_model_shape_is_refused)
{
	kvp_shape s = small_shape();
	const char *path;

	s.n_layers = 3;
	path = write_valid("layers.kvtria");
	expect_refused(path, &s, KVP_EINVAL, "do not match");
	s = small_shape(), s.n_heads = 8, s.n_kv_heads = 2;
	path = write_valid("heads.kvtria");
	expect_refused(path, &s, KVP_EINVAL, "2 x 8 x 8");
	s = small_shape(), s.rope_theta = 1e6f;
	path = write_valid("theta2.kvtria");
	expect_refused(path, &s, KVP_EINVAL, "rope_theta");
}

Test(kvtria, the_policy_refuses_a_mismatched_stats_file)
{
	kvp_shape s = small_shape();
	const char *path = write_valid("policy.kvtria");
	char spec[300];
	kvp_policy *p = NULL;

	s.head_dim = 16;
	snprintf(spec, sizeof spec, "triattention(stats=%s)", path);
	cr_assert_eq(kvp_policy_open(spec, &s, &p), KVP_EINVAL);
	cr_assert_null(p);
	cr_assert(strstr(kvp_last_error(), "head_dim 8"), "%s", kvp_last_error());
	s.head_dim = 8;
	cr_assert_eq(kvp_policy_open(spec, &s, &p), KVP_OK, "%s", kvp_last_error());
	kvp_policy_close(p);
	unlink(path);
}
