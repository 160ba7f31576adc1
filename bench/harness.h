/*
 * The benchmark harness: wall-clock timing with warm-up and best-of-N, a memcpy bandwidth probe, and
 * one table format, so every figure is printed beside the baseline it was measured against in the
 * same run.
 */
#ifndef KVP_BENCH_HARNESS_H
#define KVP_BENCH_HARNESS_H

#include <stddef.h>

double bench_now(void);
/* Seconds per call of fn(arg): best of `reps` timed runs after one warm-up. */
double bench_time(void (*fn)(void *), void *arg, int reps);
/* bench_time with the caches emptied before every run (by reading every line of
 * BENCH_EVICT_BYTES, four times a server CPU's L3 slice), untimed: a call that finds none of its data in
 * cache, as one layer of a model does after every other layer has been read. */
#define BENCH_EVICT_BYTES ((size_t)128 << 20)
double bench_time_cold(void (*fn)(void *), void *arg, int reps);
/* bench_time_cold of n calls taken in turn, fn[0], fn[1], .., fn[n-1], reps times, so that each one's
 * best (into best[k]) comes from the same stretch of a shared machine's load as the others': a ratio of
 * two of them then moves with the code, not with what ran beside it. */
struct bench_call {
	void (*fn)(void *);
	void *arg;
};
void bench_time_cold_turns(const struct bench_call *calls, unsigned n, int reps, double *best);
/* A memcpy of `bytes` between two buffers of its own, as a bench_call (bench_copy_run): bytes over its
 * time is the memcpy bandwidth. */
struct bench_copy;
struct bench_copy *bench_copy_open(size_t bytes);
void bench_copy_run(void *copy);
void bench_copy_close(struct bench_copy *copy);
/* memcpy bandwidth in bytes/s of copy's buffers, best of a few runs. */
double bench_memcpy_bandwidth(struct bench_copy *copy);
/* Reps from the environment (KVP_BENCH_REPS) or the given default: CI can make runs short. */
int bench_reps(int fallback);

void bench_header(const char *title);
/* One row: what was measured and its ratio to the baseline (value / baseline, both in the same unit);
 * the value is printed as value * scale in `unit`. */
void bench_row(const char *config, const char *measure, double value, double baseline, double scale,
	       const char *unit, const char *baseline_name);

#endif
