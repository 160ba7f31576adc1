/*
 * The .kvtria statistics file (DESIGN.md): "KVTRIA01", uint32 n_layers, n_heads, head_dim, rope_layout,
 * float32 rope_theta, uint32 reserved[3], then per layer, per query head: float32 q_mean_re[d/2],
 * q_mean_im[d/2], q_abs_mean[d/2]. Little endian throughout; read and written byte by byte so the code
 * does not depend on the host's byte order.
 *
 * Reading checks before it spends: only a regular file is read (opened without blocking, so a FIFO is
 * refused instead of waiting for a writer); the 40-byte header is checked, against the model's shape
 * when one is given, and the file's size must be exactly what the header implies before a byte of the
 * body is read. The body is then read a chunk at a time straight into the statistics.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "policies/policy.h"

#define MAX_LAYERS 4096u
#define MAX_HEADS 4096u
#define MAX_HEAD_DIM 4096u
/* |E q| <= E|q| holds exactly; the slack covers fp32 rounding of the sums. */
#define MRL_SLACK 1e-3f
/* bytes of the body read at a time */
#define BODY_CHUNK (256u << 10)

/* Floats in each of the three arrays. */
static size_t stats_bands(const struct kvp_tria_stats *s)
{
	return (size_t)s->n_layers * s->n_heads * (s->head_dim / 2);
}

static kvp_status stats_alloc_in(struct kvp_tria_stats *s, const struct kvp_allocator *mem, uint32_t n_layers,
				 uint32_t n_heads, uint32_t head_dim, kvp_rope_layout layout, float theta)
{
	size_t n;

	memset(s, 0, sizeof *s);
	s->n_layers = n_layers;
	s->n_heads = n_heads;
	s->head_dim = head_dim;
	s->rope_layout = layout;
	s->rope_theta = theta;
	s->mem = *mem;
	n = stats_bands(s);
	s->mean_re = kvp_allocate_array(mem, n, sizeof(float), "kvtria: statistics");
	s->mean_im = s->mean_re ? kvp_allocate_array(mem, n, sizeof(float), "kvtria: statistics") : NULL;
	s->abs_mean = s->mean_im ? kvp_allocate_array(mem, n, sizeof(float), "kvtria: statistics") : NULL;
	if (!s->abs_mean) {
		kvp_tria_stats_free(s);
		return KVP_ENOMEM;
	}
	return KVP_OK;
}

kvp_status kvp_tria_stats_alloc(struct kvp_tria_stats *s, uint32_t n_layers, uint32_t n_heads,
				uint32_t head_dim, kvp_rope_layout layout, float theta)
{
	return stats_alloc_in(s, &kvp_heap, n_layers, n_heads, head_dim, layout, theta);
}

void kvp_tria_stats_free(struct kvp_tria_stats *s)
{
	/* a zeroed struct, never allocated, has no allocator and nothing to give back */
	const struct kvp_allocator *mem = s->mem.free ? &s->mem : &kvp_heap;
	size_t bytes = stats_bands(s) * sizeof(float);

	kvp_release(mem, s->mean_re, bytes), kvp_release(mem, s->mean_im, bytes), kvp_release(mem, s->abs_mean, bytes);
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

static const char *layout_name(kvp_rope_layout l)
{
	return l == KVP_ROPE_HALF ? "half" : "interleaved";
}

kvp_status kvp_tria_stats_check(const char *path, const struct kvp_tria_stats *s, const kvp_shape *shape)
{
	if (s->n_layers != shape->n_layers || s->n_heads != shape->n_heads || s->head_dim != shape->head_dim)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': statistics for %u layers x %u heads x head_dim %u do not "
				"match the model's %u x %u x %u", path, s->n_layers, s->n_heads, s->head_dim,
				shape->n_layers, shape->n_heads, shape->head_dim);
	if (fabsf(s->rope_theta - shape->rope_theta) > 1e-5f * shape->rope_theta)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': rope_theta %g does not match the model's %g", path,
				(double)s->rope_theta, (double)shape->rope_theta);
	/* a file calibrated with the other layout comes from another model's (or another export's) queries */
	if (s->rope_layout != shape->rope_layout)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': rope_layout %s does not match the model's %s", path,
				layout_name(s->rope_layout), layout_name(shape->rope_layout));
	return KVP_OK;
}

/* Decodes one head's record (q_mean_re, q_mean_im, q_abs_mean) into s, checking every value. */
static kvp_status decode_head(const char *path, const unsigned char *p, struct kvp_tria_stats *s, uint32_t l,
			      uint32_t h)
{
	unsigned F = s->head_dim / 2;
	size_t at = kvp_tria_stats_at(s, l, h);

	for (unsigned f = 0; f < F; f++) {
		float re = get_f32(p + 4 * f), im = get_f32(p + 4 * (F + f)), a = get_f32(p + 4 * (2 * F + f));
		if (!isfinite(re) || !isfinite(im) || !isfinite(a) || a < 0)
			return kvp_fail(KVP_ECORRUPT, "kvtria '%s': layer %u head %u band %u holds a non-finite or "
					"negative value", path, l, h, f);
		if (sqrtf(re * re + im * im) > a * (1 + MRL_SLACK) + 1e-6f)
			return kvp_fail(KVP_ECORRUPT, "kvtria '%s': layer %u head %u band %u: |q_mean| %g exceeds "
					"q_abs_mean %g", path, l, h, f, (double)sqrtf(re * re + im * im), (double)a);
		s->mean_re[at + f] = re;
		s->mean_im[at + f] = im;
		s->abs_mean[at + f] = a;
	}
	return KVP_OK;
}

/* Reads exactly len bytes at offset, across short reads and interruptions. */
static kvp_status read_at(const char *path, int fd, unsigned char *buf, size_t len, off_t offset)
{
	while (len) {
		ssize_t r = pread(fd, buf, len, offset);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return kvp_fail(KVP_EIO, "kvtria '%s': read at offset %lld: %s", path, (long long)offset,
					r < 0 ? strerror(errno) : "the file shrank while it was read");
		buf += r, len -= (size_t)r, offset += r;
	}
	return KVP_OK;
}

/*
 * Opens path for reading without blocking (a FIFO would wait for a writer forever) and without
 * following it into anything but a regular file; *size is its length.
 */
static kvp_status open_regular(const char *path, int *fd, off_t *size)
{
	struct stat st;

	*fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (*fd < 0)
		return kvp_fail(KVP_EINVAL, "kvtria '%s': cannot open: %s", path, strerror(errno));
	if (fstat(*fd, &st) != 0) {
		close(*fd);
		return kvp_fail(KVP_EIO, "kvtria '%s': fstat: %s", path, strerror(errno));
	}
	if (!S_ISREG(st.st_mode)) {
		close(*fd);
		return kvp_fail(KVP_EINVAL, "kvtria '%s': %s, not a regular file", path,
				S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO"
				: S_ISSOCK(st.st_mode) ? "a socket" : "a device");
	}
	*size = st.st_size;
	return KVP_OK;
}

/* The body, a chunk of whole heads at a time: memory is the statistics and one chunk, not the file. */
static kvp_status read_body(const char *path, int fd, struct kvp_tria_stats *s)
{
	size_t head_bytes = (size_t)s->head_dim / 2 * 3 * 4, heads = (size_t)s->n_layers * s->n_heads;
	size_t per_chunk = BODY_CHUNK / head_bytes ? BODY_CHUNK / head_bytes : 1;
	unsigned char *buf = malloc(per_chunk * head_bytes);
	kvp_status st = buf ? KVP_OK : kvp_fail(KVP_ENOMEM, "kvtria '%s': out of memory", path);

	for (size_t h = 0; st == KVP_OK && h < heads; h += per_chunk) {
		size_t n = heads - h < per_chunk ? heads - h : per_chunk;
		st = read_at(path, fd, buf, n * head_bytes, (off_t)(KVP_KVTRIA_HEADER + h * head_bytes));
		for (size_t i = 0; st == KVP_OK && i < n; i++)
			st = decode_head(path, buf + i * head_bytes, s, (uint32_t)((h + i) / s->n_heads),
					 (uint32_t)((h + i) % s->n_heads));
	}
	free(buf);
	return st;
}

kvp_status kvp_tria_stats_read(const char *path, const kvp_shape *shape, struct kvp_tria_stats *out)
{
	return kvp_tria_stats_read_in(path, shape, &kvp_heap, out);
}

kvp_status kvp_tria_stats_read_in(const char *path, const kvp_shape *shape, const struct kvp_allocator *mem,
				  struct kvp_tria_stats *out)
{
	struct kvp_tria_stats s;
	unsigned char header[KVP_KVTRIA_HEADER];
	off_t size = 0;
	uint64_t want;
	kvp_status st;
	int fd;

	if (!path || !mem || !out)
		return kvp_fail(KVP_EINVAL, "kvtria: NULL path, memory or result");
	memset(out, 0, sizeof *out);
	memset(&s, 0, sizeof s);
	if ((st = open_regular(path, &fd, &size)) != KVP_OK)
		return st;
	if (size < (off_t)KVP_KVTRIA_HEADER)
		st = kvp_fail(KVP_ECORRUPT, "kvtria '%s': %lld bytes is shorter than the %u-byte header", path,
			      (long long)size, KVP_KVTRIA_HEADER);
	if (st == KVP_OK)
		st = read_at(path, fd, header, sizeof header, 0);
	if (st == KVP_OK)
		st = check_header(path, header, &s);
	if (st == KVP_OK && shape)
		st = kvp_tria_stats_check(path, &s, shape);
	/* the size follows from the header: anything else is refused before a byte of the body is read */
	want = KVP_KVTRIA_HEADER + (uint64_t)s.n_layers * s.n_heads * (s.head_dim / 2) * 3 * 4;
	if (st == KVP_OK && (uint64_t)size != want)
		st = kvp_fail(KVP_ECORRUPT, "kvtria '%s': %lld bytes, but %u layers x %u heads x head_dim %u need "
			      "%llu (%s)", path, (long long)size, s.n_layers, s.n_heads, s.head_dim,
			      (unsigned long long)want, (uint64_t)size < want ? "truncated" : "trailing bytes");
	if (st == KVP_OK)
		st = stats_alloc_in(out, mem, s.n_layers, s.n_heads, s.head_dim, s.rope_layout, s.rope_theta);
	if (st == KVP_OK && (st = read_body(path, fd, out)) != KVP_OK)
		kvp_tria_stats_free(out);
	close(fd);
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

double kvp_gate_mrl(const struct kvp_tria_stats *s, uint32_t layer, uint32_t kv_head, uint32_t n_kv_heads)
{
	unsigned group = s->n_heads / n_kv_heads, F = s->head_dim / 2;
	double resultant = 0, energy = 0;

	for (unsigned g = 0; g < group; g++) {
		size_t at = kvp_tria_stats_at(s, layer, kv_head * group + g);
		for (unsigned f = 0; f < F; f++) {
			resultant += hypot(s->mean_re[at + f], s->mean_im[at + f]);
			energy += s->abs_mean[at + f];
		}
	}
	if (!(energy > 0))
		return 0;
	return resultant > energy ? 1.0 : resultant / energy;
}
