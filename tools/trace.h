/*
 * tools/trace.h — writing and reading attention traces (format: include/kvpager_trace.h).
 *
 * The reader trusts nothing in the file: the header's magic, version, shape and limits are checked
 * before anything is allocated from them, the file size must be a whole number of steps, and every
 * record's layer, position and floats are checked as they are read. Every failure leaves a message that
 * names the file and what is wrong.
 */
#ifndef KVP_TOOLS_TRACE_H
#define KVP_TOOLS_TRACE_H

#include <stdint.h>
#include <stdio.h>

#include "kvpager.h"
#include "kvpager_trace.h"

#define TRACE_ERROR_MAX 512

struct trace_writer {
	FILE *file;
	kvp_shape shape;
	char error[TRACE_ERROR_MAX];
};

/* Creates path and writes the header. Returns 0, or -1 with writer->error set. */
int trace_writer_open(struct trace_writer *w, const char *path, const kvp_shape *shape);
/* One record: q [n_heads][head_dim], k and v [n_kv_heads][head_dim]. */
int trace_write(struct trace_writer *w, uint32_t layer, int32_t pos, const float *q, const float *k,
		const float *v);
/* Flushes and closes; returns -1 when any write failed. */
int trace_writer_close(struct trace_writer *w);

struct trace_reader {
	FILE *file;
	const char *path;
	kvp_shape shape;
	uint64_t n_steps;
	uint64_t step;       /* the next step read_step returns */
	int64_t last_pos;    /* the previous step's position; -1 before the first */
	float *record;       /* one record's floats */
	char error[TRACE_ERROR_MAX];
};

/* Opens and checks the header and the size. Returns 0, or -1 with reader->error set. */
int trace_reader_open(struct trace_reader *r, const char *path);
/*
 * Reads every layer of the next step: q [n_layers][n_heads][head_dim], k and v
 * [n_layers][n_kv_heads][head_dim]. Returns 1 with a step, 0 at the end, -1 on a bad record.
 */
int trace_read_step(struct trace_reader *r, int32_t *pos, float *q, float *k, float *v);
/* Back to the first step. */
int trace_reader_rewind(struct trace_reader *r);
void trace_reader_close(struct trace_reader *r);

#endif /* KVP_TOOLS_TRACE_H */
