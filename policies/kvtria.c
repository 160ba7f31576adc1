/*
 * The .kvtria statistics file (DESIGN.md): "KVTRIA01", uint32 n_layers, n_heads, head_dim, rope_layout,
 * float32 rope_theta, uint32 reserved[3], then per layer, per query head: float32 q_mean_re[d/2],
 * q_mean_im[d/2], q_abs_mean[d/2]. Little endian throughout; read and written byte by byte so the code
 * does not depend on the host's byte order.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

#define MAX_LAYERS 4096u
#define MAX_HEADS 4096u
#define MAX_HEAD_DIM 4096u
/* |E q| <= E|q| holds exactly; the slack covers fp32 rounding of the sums. */
#define MRL_SLACK 1e-3f

kvp_status kvp_tria_stats_alloc(struct kvp_tria_stats *s, uint32_t n_layers, uint32_t n_heads,
				uint32_t head_dim, kvp_rope_layout layout, float theta)
{
	size_t n = (size_t)n_layers * n_heads * (head_dim / 2);

	memset(s, 0, sizeof *s);
	s->n_layers = n_layers;
	s->n_heads = n_heads;
	s->head_dim = head_dim;
	s->rope_layout = layout;
	s->rope_theta = theta;
	s->mean_re = calloc(n ? n : 1, sizeof(float));
	s->mean_im = calloc(n ? n : 1, sizeof(float));
	s->abs_mean = calloc(n ? n : 1, sizeof(float));
	if (!s->mean_re || !s->mean_im || !s->abs_mean) {
		kvp_tria_stats_free(s);
		return kvp_fail(KVP_ENOMEM, "kvtria: out of memory for %u x %u heads", n_layers, n_heads);
	}
	return KVP_OK;
}

void kvp_tria_stats_free(struct kvp_tria_stats *s)
{
	free(s->mean_re), free(s->mean_im), free(s->abs_mean);
	s->mean_re = s->mean_im = s->abs_mean = NULL;
}

size_t kvp_tria_stats_at(const struct kvp_tria_stats *s, uint32_t layer, uint32_t head)
{
	return ((size_t)layer * s->n_heads + head) * (s->head_dim / 2);
}

static uint32_t get_u32(const unsigned char *b)
{
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static float get_f32(const unsigned char *b)
{
	uint32_t u = get_u32(b);
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

static void put_u32(unsigned char *b, uint32_t v)
{
	b[0] = (unsigned char)v, b[1] = (unsigned char)(v >> 8), b[2] = (unsigned char)(v >> 16);
	b[3] = (unsigned char)(v >> 24);
}

static void put_f32(unsigned char *b, float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof u);
	put_u32(b, u);
}

/* Header fields that make sense on their own, before the body is read. */
static kvp_status check_header(const char *path, const unsigned char *h, struct kvp_tria_stats *s)
{
	if (memcmp(h, KVP_KVTRIA_MAGIC, 8))
		return kvp_fail(KVP_ECORRUPT, "kvtria '%s': wrong magic (not a .kvtria file)", path);
	s->n_layers = get_u32(h + 8);
	s->n_heads = get_u32(h + 12);
	s->head_dim = get_u32(h + 16);
	s->rope_layout = (kvp_rope_layout)get_u32(h + 20);
	s->rope_theta = get_f32(h + 24);
	if (!s->n_layers || s->n_layers > MAX_LAYERS || !s->n_heads || s->n_heads > MAX_HEADS)
		return kvp_fail(KVP_ECORRUPT, "kvtria '%s': %u layers x %u heads is outside 1..%u each", path,
				s->n_layers, s->n_heads, MAX_LAYERS);
	if (!s->head_dim || s->head_dim % 2 || s->head_dim > MAX_HEAD_DIM)
		return kvp_fail(KVP_ECORRUPT, "kvtria '%s': head_dim %u is not an even number in 2..%u", path,
				s->head_dim, MAX_HEAD_DIM);
	if (get_u32(h + 20) > KVP_ROPE_INTERLEAVED)
		return kvp_fail(KVP_ECORRUPT, "kvtria '%s': unknown rope_layout %u", path, get_u32(h + 20));
	if (!isfinite(s->rope_theta) || !(s->rope_theta > 1.0f))
		return kvp_fail(KVP_ECORRUPT, "kvtria '%s': rope_theta %g is not a finite number above 1", path,
				(double)s->rope_theta);
	return KVP_OK;
}

static kvp_status check_shape(const char *path, const struct kvp_tria_stats *s, const kvp_shape *shape)
{
	if (s->n_layers != shape->n_layers || s->n_heads != shape->n_heads || s->head_dim != shape->head_dim)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': statistics for %u layers x %u heads x head_dim %u do not "
				"match the model's %u x %u x %u", path, s->n_layers, s->n_heads, s->head_dim,
				shape->n_layers, shape->n_heads, shape->head_dim);
	if (fabsf(s->rope_theta - shape->rope_theta) > 1e-5f * shape->rope_theta)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': rope_theta %g does not match the model's %g", path,
				(double)s->rope_theta, (double)shape->rope_theta);
	return KVP_OK;
}

/* Decodes the body into s's arrays, checking every value; returns the fault's message on failure. */
static kvp_status read_body(const char *path, const unsigned char *b, struct kvp_tria_stats *s)
{
	unsigned F = s->head_dim / 2;

	for (uint32_t l = 0; l < s->n_layers; l++)
		for (uint32_t h = 0; h < s->n_heads; h++) {
			size_t at = kvp_tria_stats_at(s, l, h);
			const unsigned char *p = b + at * 3 * 4;
			for (unsigned f = 0; f < F; f++) {
				float re = get_f32(p + 4 * f), im = get_f32(p + 4 * (F + f)),
				      a = get_f32(p + 4 * (2 * F + f));
				if (!isfinite(re) || !isfinite(im) || !isfinite(a) || a < 0)
					return kvp_fail(KVP_ECORRUPT, "kvtria '%s': layer %u head %u band %u holds a "
							"non-finite or negative value", path, l, h, f);
				if (sqrtf(re * re + im * im) > a * (1 + MRL_SLACK) + 1e-6f)
					return kvp_fail(KVP_ECORRUPT, "kvtria '%s': layer %u head %u band %u: |q_mean| "
							"%g exceeds q_abs_mean %g", path, l, h, f,
							(double)sqrtf(re * re + im * im), (double)a);
				s->mean_re[at + f] = re;
				s->mean_im[at + f] = im;
				s->abs_mean[at + f] = a;
			}
		}
	return KVP_OK;
}

static kvp_status read_file(const char *path, unsigned char **buf, size_t *len)
{
	FILE *f = fopen(path, "rb");
	long size;

	if (!f)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': cannot open: %s", path, strerror(errno));
	if (fseek(f, 0, SEEK_END) || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		fclose(f);
		return kvp_fail(KVP_EIO, "kvtria '%s': cannot size the file", path);
	}
	*buf = malloc((size_t)size + 1);
	if (!*buf) {
		fclose(f);
		return kvp_fail(KVP_ENOMEM, "kvtria '%s': out of memory for %ld bytes", path, size);
	}
	*len = fread(*buf, 1, (size_t)size, f);
	fclose(f);
	if (*len != (size_t)size) {
		free(*buf);
		return kvp_fail(KVP_EIO, "kvtria '%s': short read", path);
	}
	return KVP_OK;
}

kvp_status kvp_tria_stats_read(const char *path, const kvp_shape *shape, struct kvp_tria_stats *out)
{
	struct kvp_tria_stats s;
	unsigned char *buf = NULL;
	size_t len = 0, want;
	kvp_status st;

	if (!path || !out)
		return kvp_fail(KVP_EINVAL, "kvtria: NULL path or result");
	st = read_file(path, &buf, &len);
	if (st != KVP_OK)
		return st;
	memset(&s, 0, sizeof s);
	if (len < KVP_KVTRIA_HEADER)
		st = kvp_fail(KVP_ECORRUPT, "kvtria '%s': %zu bytes is shorter than the %u-byte header", path, len,
			      KVP_KVTRIA_HEADER);
	if (st == KVP_OK)
		st = check_header(path, buf, &s);
	if (st == KVP_OK && shape)
		st = check_shape(path, &s, shape);
	want = KVP_KVTRIA_HEADER + (size_t)s.n_layers * s.n_heads * (s.head_dim / 2) * 3 * 4;
	if (st == KVP_OK && len != want)
		st = kvp_fail(KVP_ECORRUPT, "kvtria '%s': %zu bytes, but %u layers x %u heads x head_dim %u need %zu "
			      "(%s)", path, len, s.n_layers, s.n_heads, s.head_dim, want,
			      len < want ? "truncated" : "trailing bytes");
	if (st == KVP_OK)
		st = kvp_tria_stats_alloc(out, s.n_layers, s.n_heads, s.head_dim, s.rope_layout, s.rope_theta);
	if (st == KVP_OK) {
		st = read_body(path, buf + KVP_KVTRIA_HEADER, out);
		if (st != KVP_OK)
			kvp_tria_stats_free(out);
	}
	free(buf);
	return st;
}

kvp_status kvp_tria_stats_write(const char *path, const struct kvp_tria_stats *s)
{
	unsigned F = s->head_dim / 2;
	size_t heads = (size_t)s->n_layers * s->n_heads, len = KVP_KVTRIA_HEADER + heads * F * 12;
	unsigned char *buf = calloc(len, 1);
	FILE *f;
	int ok;

	if (!buf)
		return kvp_fail(KVP_ENOMEM, "kvtria '%s': out of memory", path);
	memcpy(buf, KVP_KVTRIA_MAGIC, 8);
	put_u32(buf + 8, s->n_layers), put_u32(buf + 12, s->n_heads), put_u32(buf + 16, s->head_dim);
	put_u32(buf + 20, (uint32_t)s->rope_layout), put_f32(buf + 24, s->rope_theta);
	for (size_t h = 0; h < heads; h++) {
		unsigned char *p = buf + KVP_KVTRIA_HEADER + h * F * 12;
		for (unsigned b = 0; b < F; b++) {
			put_f32(p + 4 * b, s->mean_re[h * F + b]);
			put_f32(p + 4 * (F + b), s->mean_im[h * F + b]);
			put_f32(p + 4 * (2 * F + b), s->abs_mean[h * F + b]);
		}
	}
	f = fopen(path, "wb");
	ok = f && fwrite(buf, 1, len, f) == len;
	ok = (f && fclose(f) == 0) && ok;
	free(buf);
	if (!ok)
		return kvp_fail(KVP_EIO, "kvtria '%s': cannot write: %s", path, strerror(errno));
	return KVP_OK;
}
