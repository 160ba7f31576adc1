/* The .kvtria statistics file: round trip, and every kind of bad file refused with a message naming it. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "kvpager.h"
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

Test(kvtria, a_file_for_the_other_rope_layout_is_refused)
{
	kvp_shape s = small_shape();
	const char *path = write_valid("rope.kvtria"); /* interleaved */

	s.rope_layout = KVP_ROPE_HALF;
	expect_refused(path, &s, KVP_EINVAL, "rope_layout interleaved does not match the model's half");
}

static long max_rss_kib(void)
{
	struct rusage ru;
	cr_assert_eq(getrusage(RUSAGE_SELF, &ru), 0);
	return ru.ru_maxrss;
}

/* Bytes this process has had from read() and pread() so far (/proc/self/io's rchar), or -1 where the
 * kernel does not count them. */
static long long bytes_read(void)
{
	FILE *f = fopen("/proc/self/io", "r");
	long long n = -1;
	if (f) {
		if (fscanf(f, "rchar: %lld", &n) != 1)
			n = -1;
		fclose(f);
	}
	return n;
}

Test(kvtria, a_huge_file_is_refused_from_its_header_without_reading_it)
{
	kvp_shape s = small_shape();
	const char *path = write_valid("huge3g.kvtria");
	struct kvp_tria_stats st = { 0 };
	long rss = max_rss_kib();
	long long before;

	cr_assert_eq(truncate(path, 3ll << 30), 0, "a sparse 3 GiB file"); /* holes read as zeros */
	before = bytes_read();
	cr_assert_eq(kvp_tria_stats_read(path, &s, &st), KVP_ECORRUPT);
	if (before >= 0) /* the file is refused from its size: at most its header is read */
		cr_assert_lt(bytes_read() - before, 64 << 10, "%lld bytes read", bytes_read() - before);
	cr_assert(strstr(kvp_last_error(), "3221225472 bytes, but 2 layers x 4 heads x head_dim 8 need 424 "
				   "(trailing bytes)"), "%s", kvp_last_error());
	cr_assert_lt(max_rss_kib() - rss, 16 << 10, "peak RSS grew by %ld KiB", max_rss_kib() - rss);
	cr_assert_null(st.mean_re);
	unlink(path);
}

Test(kvtria, a_fifo_is_refused_without_waiting_for_a_writer, .timeout = 10)
{
	const char *path = fixture_path("fifo.kvtria");

	cr_assert_eq(mkfifo(path, 0600), 0);
	expect_refused(path, NULL, KVP_EINVAL, "a FIFO, not a regular file");
}

Test(kvtria, a_directory_is_refused_with_a_message)
{
	const char *path = fixture_path("dir.kvtria");
	struct kvp_tria_stats st = { 0 };

	cr_assert_eq(mkdir(path, 0700), 0);
	cr_assert_eq(kvp_tria_stats_read(path, NULL, &st), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), path), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "a directory, not a regular file"), "%s", kvp_last_error());
	rmdir(path);
}

Test(kvtria, a_tenant_reads_its_stats_file_once_for_all_its_sequences)
{
	kvp_shape s = small_shape(), other = small_shape();
	const char *path = write_valid("tenant.kvtria");
	char spec[400];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *a, *b, *c, *bad = NULL;

	snprintf(spec, sizeof spec, "policy=triattention(budget=64,stats=%s)", path);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &t), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(unlink(path), 0);
	cr_assert_eq(kvp_seq_open(t, &s, &a), KVP_OK, "the file is gone: %s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(t, &s, &b), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_fork(a, &c), KVP_OK, "%s", kvp_last_error());
	other.head_dim = 16; /* each sequence's shape is still checked against the file */
	cr_assert_eq(kvp_seq_open(t, &other, &bad), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "head_dim 8 do not match the model's 2 x 4 x 16"), "%s", kvp_last_error());
	kvp_seq_close(a);
	kvp_seq_close(c);
	cr_assert_eq(kvp_seq_open(t, &s, &a), KVP_OK, "%s", kvp_last_error());
	kvp_tenant_close(t); /* closes a and b */
	kvp_pool_close(pool);
}

Test(kvtria, a_tenant_with_a_bad_stats_file_is_refused_at_open)
{
	const char *path = write_valid("tenant-bad.kvtria");
	char spec[400];
	kvp_pool *pool;
	kvp_tenant *t = (kvp_tenant *)1;

	poke_u32(path, 0, 0);
	snprintf(spec, sizeof spec, "policy=triattention(stats=%s)", path);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &t), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "wrong magic"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "policy=triattention"), "%s", kvp_last_error());
	cr_assert_null(t);
	kvp_pool_close(pool);
	unlink(path);
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

/* A file of zero statistics (valid: every |mean| <= mean magnitude) for 8 layers x 32 heads x head_dim
 * 128: 3 x 16384 floats, 192 KiB. */
static const char *write_large(const char *name)
{
	struct kvp_tria_stats st;
	const char *path = fixture_path(name);

	cr_assert_eq(kvp_tria_stats_alloc(&st, 8, 32, 128, KVP_ROPE_HALF, 10000.0f), KVP_OK);
	cr_assert_eq(kvp_tria_stats_write(path, &st), KVP_OK, "%s", kvp_last_error());
	kvp_tria_stats_free(&st);
	return path;
}

static uint64_t tenant_meta(kvp_tenant *t)
{
	kvp_stats st = { .size = sizeof st };

	cr_assert_eq(kvp_tenant_stats(t, &st), KVP_OK, "%s", kvp_last_error());
	return st.bytes_meta;
}

Test(kvtria, a_tenants_stats_file_is_charged_to_it_and_shown_in_bytes_meta)
{
	const char *path = write_large("charged.kvtria");
	char spec[400];
	kvp_pool *pool;
	kvp_tenant *online, *file;

	snprintf(spec, sizeof spec, "policy=triattention(stats=%s)", path);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "online", "policy=triattention(stats=online)", &online), KVP_OK);
	cr_assert_eq(kvp_tenant_open(pool, "file", spec, &file), KVP_OK, "%s", kvp_last_error());
	cr_assert_geq(tenant_meta(file), tenant_meta(online) + 3 * 16384 * sizeof(float),
		      "the statistics (192 KiB) count in the tenant's bytes_meta: %llu",
		      (unsigned long long)tenant_meta(file));
	kvp_pool_close(pool);
	unlink(path);
}

Test(kvtria, a_stats_file_larger_than_the_quota_refuses_the_tenant_whole)
{
	const char *path = write_large("over-quota.kvtria");
	char spec[400];
	kvp_pool *pool;
	kvp_tenant *t = NULL;

	snprintf(spec, sizeof spec, "quota=64KiB,policy=triattention(stats=%s)", path);
	cr_assert_eq(kvp_pool_open("", &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &t), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert_null(t);
	/* nothing of it is left: the name is free, and a quota that holds the file takes it */
	snprintf(spec, sizeof spec, "quota=1MiB,policy=triattention(stats=%s)", path);
	cr_assert_eq(kvp_tenant_open(pool, "t", spec, &t), KVP_OK, "%s", kvp_last_error());
	kvp_pool_close(pool);
	unlink(path);
}
