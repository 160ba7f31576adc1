/*
 * tools/trace.c — attention traces on disk (see tools/trace.h and include/kvpager_trace.h).
 */
#include "tools/trace.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Records are read and written as the host lays out floats: the format is little-endian. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tools/trace.c reads and writes little-endian floats directly; this host is big-endian"
#endif

static int trace_fail(char error[TRACE_ERROR_MAX], const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int trace_fail(char error[TRACE_ERROR_MAX], const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(error, TRACE_ERROR_MAX, fmt, ap);
	va_end(ap);
	return -1;
}

static uint64_t record_floats(const kvp_shape *s)
{
	return ((uint64_t)s->n_heads + 2 * (uint64_t)s->n_kv_heads) * s->head_dim;
}

/* ---- writing ---- */

int trace_writer_open(struct trace_writer *w, const char *path, const kvp_shape *shape)
{
	struct kvp_trace_header h = {
		.version = KVP_TRACE_VERSION,
		.header_bytes = KVP_TRACE_HEADER_BYTES,
		.n_layers = shape->n_layers,
		.n_heads = shape->n_heads,
		.n_kv_heads = shape->n_kv_heads,
		.head_dim = shape->head_dim,
		.rope_theta = shape->rope_theta,
		.rope_layout = (uint32_t)shape->rope_layout,
	};

	memset(w, 0, sizeof(*w));
	w->shape = *shape;
	memcpy(h.magic, KVP_TRACE_MAGIC, KVP_TRACE_MAGIC_BYTES);
	w->file = fopen(path, "wb");
	if (!w->file)
		return trace_fail(w->error, "%s: cannot create the trace: %s", path, strerror(errno));
	if (fwrite(&h, sizeof(h), 1, w->file) != 1) {
		fclose(w->file);
		w->file = NULL;
		return trace_fail(w->error, "%s: cannot write the trace header: %s", path, strerror(errno));
	}
	return 0;
}

int trace_write(struct trace_writer *w, uint32_t layer, int32_t pos, const float *q, const float *k,
		const float *v)
{
	size_t nq = (size_t)w->shape.n_heads * w->shape.head_dim;
	size_t nkv = (size_t)w->shape.n_kv_heads * w->shape.head_dim;
	int ok;

	ok = fwrite(&layer, 4, 1, w->file) == 1 && fwrite(&pos, 4, 1, w->file) == 1 &&
	     fwrite(q, sizeof(float), nq, w->file) == nq && fwrite(k, sizeof(float), nkv, w->file) == nkv &&
	     fwrite(v, sizeof(float), nkv, w->file) == nkv;
	return ok ? 0 : trace_fail(w->error, "cannot write a trace record: %s", strerror(errno));
}

int trace_writer_close(struct trace_writer *w)
{
	int rc = 0;

	if (!w->file)
		return 0;
	if (ferror(w->file) || fclose(w->file) != 0)
		rc = trace_fail(w->error, "cannot finish the trace: %s", strerror(errno));
	w->file = NULL;
	return rc;
}

/* ---- reading ---- */

static int check_shape(struct trace_reader *r, const struct kvp_trace_header *h)
{
	if (h->n_layers < 1 || h->n_layers > KVP_TRACE_MAX_LAYERS)
		return trace_fail(r->error, "%s: n_layers %u is outside 1..%d", r->path, h->n_layers,
				  KVP_TRACE_MAX_LAYERS);
	if (h->n_heads < 1 || h->n_heads > KVP_TRACE_MAX_HEADS)
		return trace_fail(r->error, "%s: n_heads %u is outside 1..%d", r->path, h->n_heads,
				  KVP_TRACE_MAX_HEADS);
	if (h->n_kv_heads < 1 || h->n_heads % h->n_kv_heads)
		return trace_fail(r->error, "%s: n_kv_heads %u does not divide n_heads %u", r->path,
				  h->n_kv_heads, h->n_heads);
	if (h->head_dim < 2 || h->head_dim > KVP_TRACE_MAX_HEAD_DIM || h->head_dim % 2)
		return trace_fail(r->error, "%s: head_dim %u is not an even number in 2..%d", r->path,
				  h->head_dim, KVP_TRACE_MAX_HEAD_DIM);
	if (!(isfinite(h->rope_theta) && h->rope_theta > 0))
		return trace_fail(r->error, "%s: rope_theta %g is not a positive number", r->path,
				  (double)h->rope_theta);
	if (h->rope_layout > KVP_ROPE_INTERLEAVED)
		return trace_fail(r->error, "%s: rope_layout %u is neither 0 (half) nor 1 (interleaved)",
				  r->path, h->rope_layout);
	return 0;
}

static int check_header(struct trace_reader *r, const struct kvp_trace_header *h)
{
	if (memcmp(h->magic, KVP_TRACE_MAGIC, KVP_TRACE_MAGIC_BYTES))
		return trace_fail(r->error, "%s: not a kvpager trace (the magic is not \"%s\")", r->path,
				  KVP_TRACE_MAGIC);
	if (h->version != KVP_TRACE_VERSION)
		return trace_fail(r->error, "%s: trace version %u; this program reads version %d", r->path,
				  h->version, KVP_TRACE_VERSION);
	if (h->header_bytes != KVP_TRACE_HEADER_BYTES)
		return trace_fail(r->error, "%s: header_bytes %u; version 1 has %d", r->path, h->header_bytes,
				  KVP_TRACE_HEADER_BYTES);
	if (h->flags)
		return trace_fail(r->error, "%s: flags %#x; version 1 defines none", r->path, h->flags);
	return check_shape(r, h);
}

/* The number of whole steps in size bytes, or -1 when the body is not a whole number of steps. */
static int count_steps(struct trace_reader *r, uint64_t size)
{
	uint64_t record = kvp_trace_record_bytes(r->shape.n_heads, r->shape.n_kv_heads, r->shape.head_dim);
	uint64_t step = record * r->shape.n_layers, body = size - KVP_TRACE_HEADER_BYTES;

	if (body % step)
		return trace_fail(r->error, "%s: truncated: %llu bytes after the header are not a whole number "
				  "of steps (%llu bytes each: %u layers of %llu-byte records)", r->path,
				  (unsigned long long)body, (unsigned long long)step, r->shape.n_layers,
				  (unsigned long long)record);
	r->n_steps = body / step;
	if (!r->n_steps)
		return trace_fail(r->error, "%s: the trace holds no steps", r->path);
	return 0;
}

static int file_bytes(FILE *f, uint64_t *size)
{
	off_t end;

	if (fseeko(f, 0, SEEK_END) != 0 || (end = ftello(f)) < 0 || fseeko(f, 0, SEEK_SET) != 0)
		return -1;
	*size = (uint64_t)end;
	return 0;
}

int trace_reader_open(struct trace_reader *r, const char *path)
{
	struct kvp_trace_header h;
	uint64_t size;

	memset(r, 0, sizeof(*r));
	r->path = path;
	r->last_pos = -1;
	r->file = fopen(path, "rb");
	if (!r->file)
		return trace_fail(r->error, "%s: cannot open the trace: %s", path, strerror(errno));
	if (file_bytes(r->file, &size) != 0)
		return trace_fail(r->error, "%s: cannot determine the size: %s", path, strerror(errno));
	if (size < sizeof(h) || fread(&h, sizeof(h), 1, r->file) != 1)
		return trace_fail(r->error, "%s: truncated: %llu bytes, a trace header alone is %zu", path,
				  (unsigned long long)size, sizeof(h));
	if (check_header(r, &h))
		return -1;
	r->shape = (kvp_shape){ .n_layers = h.n_layers, .n_heads = h.n_heads, .n_kv_heads = h.n_kv_heads,
				.head_dim = h.head_dim, .rope_theta = h.rope_theta,
				.rope_layout = (kvp_rope_layout)h.rope_layout };
	if (count_steps(r, size))
		return -1;
	r->record = malloc(record_floats(&r->shape) * sizeof(float));
	if (!r->record)
		return trace_fail(r->error, "%s: no memory for one record", path);
	return 0;
}

static int check_floats(struct trace_reader *r, uint32_t layer, const float *x, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (!isfinite(x[i]))
			return trace_fail(r->error, "%s: step %llu, layer %u: float %zu of the record is not finite",
					  r->path, (unsigned long long)r->step, layer, i);
	return 0;
}

/* Reads the record of layer l into the step's arrays, checking its layer and position. */
static int read_record(struct trace_reader *r, uint32_t l, int32_t *pos, float *q, float *k, float *v)
{
	size_t nq = (size_t)r->shape.n_heads * r->shape.head_dim;
	size_t nkv = (size_t)r->shape.n_kv_heads * r->shape.head_dim;
	uint32_t head[2];

	if (fread(head, 4, 2, r->file) != 2 || fread(r->record, sizeof(float), nq + 2 * nkv, r->file) != nq + 2 * nkv)
		return trace_fail(r->error, "%s: step %llu, layer %u: cannot read the record (the file changed?)",
				  r->path, (unsigned long long)r->step, l);
	if (head[0] != l)
		return trace_fail(r->error, "%s: step %llu: a record of layer %u where layer %u belongs", r->path,
				  (unsigned long long)r->step, head[0], l);
	if (l == 0)
		*pos = (int32_t)head[1];
	if ((int32_t)head[1] != *pos)
		return trace_fail(r->error, "%s: step %llu, layer %u: position %d, but layer 0 had %d", r->path,
				  (unsigned long long)r->step, l, (int32_t)head[1], *pos);
	if (*pos < 0 || *pos <= r->last_pos)
		return trace_fail(r->error, "%s: step %llu: position %d does not follow %lld", r->path,
				  (unsigned long long)r->step, *pos, (long long)r->last_pos);
	if (check_floats(r, l, r->record, nq + 2 * nkv))
		return -1;
	memcpy(q + l * nq, r->record, nq * sizeof(float));
	memcpy(k + l * nkv, r->record + nq, nkv * sizeof(float));
	memcpy(v + l * nkv, r->record + nq + nkv, nkv * sizeof(float));
	return 0;
}

int trace_read_step(struct trace_reader *r, int32_t *pos, float *q, float *k, float *v)
{
	uint32_t l;

	if (r->step >= r->n_steps)
		return 0;
	for (l = 0; l < r->shape.n_layers; l++)
		if (read_record(r, l, pos, q, k, v))
			return -1;
	r->last_pos = *pos;
	r->step++;
	return 1;
}

int trace_reader_rewind(struct trace_reader *r)
{
	r->step = 0;
	r->last_pos = -1;
	if (fseeko(r->file, KVP_TRACE_HEADER_BYTES, SEEK_SET) != 0)
		return trace_fail(r->error, "%s: cannot seek: %s", r->path, strerror(errno));
	return 0;
}

void trace_reader_close(struct trace_reader *r)
{
	if (r->file)
		fclose(r->file);
	free(r->record);
	r->file = NULL;
	r->record = NULL;
}
