#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"

double bench_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/*
 * Reads a byte of every line of the eviction buffer, through ordinary loads, as the other layers of a model
 * are read between two reads of one. Not memset: glibc's for large sizes is rep stosb, whose stores go
 * around the caches on the AMD EPYC this runs on, so what the cache held before stayed there (kvp_attend
 * over kivi 2-bit, 32K tokens, d=64, 13 MB: 1.77 ms a call after a 256 MiB memset, 1.79 after nothing,
 * 2.18 after 256 MiB read).
 */
static void evict_caches(void)
{
	static unsigned char *buf;
	const volatile unsigned char *p;

	if (!buf) {
		if (!(buf = malloc(BENCH_EVICT_BYTES))) {
			perror("bench: eviction buffer");
			exit(1);
		}
		memset(buf, 1, BENCH_EVICT_BYTES); /* pages never written all read the one zero page */
	}
	p = buf;
	for (size_t i = 0; i < BENCH_EVICT_BYTES; i += 64)
		(void)p[i];
}

/* One timed call of fn(arg), with before() (unless NULL) untimed ahead of it. */
static double timed_call(void (*fn)(void *), void *arg, void (*before)(void))
{
	if (before)
		before();
	double t0 = bench_now();
	fn(arg);
	return bench_now() - t0;
}

/* Best of reps timed calls after one warm-up. */
static double best_time(void (*fn)(void *), void *arg, int reps, void (*before)(void))
{
	double best = 1e30;

	fn(arg);
	for (int r = 0; r < reps; r++) {
		double t = timed_call(fn, arg, before);
		if (t < best)
			best = t;
	}
	return best;
}

double bench_time(void (*fn)(void *), void *arg, int reps)
{
	return best_time(fn, arg, reps, NULL);
}

double bench_time_cold(void (*fn)(void *), void *arg, int reps)
{
	return best_time(fn, arg, reps, evict_caches);
}

void bench_time_cold_turns(const struct bench_call *calls, unsigned n, int reps, double *best)
{
	for (unsigned k = 0; k < n; k++) {
		calls[k].fn(calls[k].arg);
		best[k] = 1e30;
	}
	for (int r = 0; r < reps; r++)
		for (unsigned k = 0; k < n; k++) {
			double t = timed_call(calls[k].fn, calls[k].arg, evict_caches);
			if (t < best[k])
				best[k] = t;
		}
}

struct bench_copy {
	void *dst;
	void *src;
	size_t bytes;
};

struct bench_copy *bench_copy_open(size_t bytes)
{
	struct bench_copy *c = malloc(sizeof *c);

	if (!c || !(c->dst = malloc(bytes)) || !(c->src = malloc(bytes))) {
		fprintf(stderr, "bench: cannot allocate %zu bytes for the memcpy probe\n", bytes);
		exit(1);
	}
	c->bytes = bytes;
	memset(c->src, 1, bytes);
	memset(c->dst, 2, bytes);
	return c;
}

void bench_copy_run(void *copy)
{
	struct bench_copy *c = copy;

	memcpy(c->dst, c->src, c->bytes);
	__asm__ volatile("" : : "r"(c->dst) : "memory");
}

void bench_copy_close(struct bench_copy *c)
{
	free(c->dst);
	free(c->src);
	free(c);
}

double bench_memcpy_bandwidth(struct bench_copy *c)
{
	return (double)c->bytes / bench_time(bench_copy_run, c, 5);
}

int bench_reps(int fallback)
{
	const char *e = getenv("KVP_BENCH_REPS");
	int r = e ? atoi(e) : 0;
	return r > 0 ? r : fallback;
}

void bench_header(const char *title)
{
	printf("\n%s\n", title);
	printf("%-34s %-22s %14s %10s  %s\n", "config", "measure", "value", "ratio", "baseline");
}

void bench_row(const char *config, const char *measure, double value, double baseline, double scale,
	       const char *unit, const char *baseline_name)
{
	char v[32];
	snprintf(v, sizeof v, "%.3f %s", value * scale, unit);
	printf("%-34s %-22s %14s %9.2fx  %s\n", config, measure, v, value / baseline, baseline_name);
	fflush(stdout);
}
