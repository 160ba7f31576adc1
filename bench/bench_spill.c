/*
 * Spill device throughput and park/unpark latency, against dd on the same file system in the same run:
 *   - park: bytes of records written per second, against `dd oflag=direct` writing 1 MiB blocks into a
 *     preallocated file beside the spill file;
 *   - unpark: bytes read (and checked) per second, against `dd iflag=direct` reading that file back;
 *   - park + unpark latency per MiB of cache, against dd writing and reading the same bytes.
 * Shape: 8 layers, 8 KV heads, 32 query heads, d=128, fp32, block=64: 64 KiB records (17 pages).
 * KVP_BENCH_DIR picks the file system (default $TMPDIR or /var/tmp); KVP_BENCH_REPS the repetitions.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "kernels/crc32c.h"
#include "kvpager.h"
#include "pager/pager.h"

enum { LAYERS = 8, NKV = 8, NH = 32, D = 128, TOKENS = 1024 };

static char dir[512], spill[600], plain[600];

static double dd_seconds(const char *args)
{
	char cmd[1600];
	double t0;
	snprintf(cmd, sizeof cmd, "dd %s status=none", args);
	t0 = bench_now();
	if (system(cmd) != 0) {
		fprintf(stderr, "bench_spill: '%s' failed\n", cmd);
		exit(1);
	}
	return bench_now() - t0;
}

/* dd's best write and read times for bytes (a multiple of 1 MiB) into a preallocated file. */
static void dd_baseline(uint64_t bytes, int reps, double *write_s, double *read_s)
{
	char args[1400];
	unsigned mib = (unsigned)(bytes >> 20);
	*write_s = *read_s = 1e30;
	snprintf(args, sizeof args, "if=/dev/zero of=%s bs=1M count=%u", plain, mib);
	dd_seconds(args); /* allocate the file, so later writes overwrite like the spill file's */
	for (int r = 0; r < reps; r++) {
		double w, rd;
		snprintf(args, sizeof args, "if=/dev/zero of=%s bs=1M count=%u oflag=direct conv=notrunc", plain, mib);
		w = dd_seconds(args);
		snprintf(args, sizeof args, "if=%s of=/dev/null bs=1M count=%u iflag=direct", plain, mib);
		rd = dd_seconds(args);
		*write_s = w < *write_s ? w : *write_s;
		*read_s = rd < *read_s ? rd : *read_s;
	}
	unlink(plain);
}

static void fill(kvp_seq *s)
{
	float *k = malloc((size_t)TOKENS * NKV * D * sizeof *k), *v = malloc((size_t)TOKENS * NKV * D * sizeof *v);
	int32_t *pos = malloc(TOKENS * sizeof *pos);
	for (size_t i = 0; i < (size_t)TOKENS * NKV * D; i++) {
		k[i] = (float)(i % 977) * 0.001f;
		v[i] = (float)(i % 613) * -0.002f;
	}
	for (int i = 0; i < TOKENS; i++)
		pos[i] = i;
	for (uint32_t l = 0; l < LAYERS; l++)
		if (kvp_append(s, l, TOKENS, pos, k, v) != KVP_OK) {
			fprintf(stderr, "bench_spill: append: %s\n", kvp_last_error());
			exit(1);
		}
	free(k);
	free(v);
	free(pos);
}

static void check(kvp_status st, const char *what)
{
	if (st != KVP_OK) {
		fprintf(stderr, "bench_spill: %s: %s\n", what, kvp_last_error());
		exit(1);
	}
}

int main(void)
{
	const kvp_shape shape = { LAYERS, NH, NKV, D, 10000.0f, KVP_ROPE_HALF };
	const char *base = getenv("KVP_BENCH_DIR");
	int reps = bench_reps(5);
	kvp_stats mem = { .size = sizeof mem }, parked = { .size = sizeof parked };
	double park_s = 1e30, unpark_s = 1e30, dd_w, dd_r;
	char spec[800], config[64];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *s;

	if (!base || !*base)
		base = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	snprintf(dir, sizeof dir, "%s/kvpager-bench-XXXXXX", base);
	if (!mkdtemp(dir)) {
		perror(dir);
		return 1;
	}
	snprintf(spill, sizeof spill, "%s/bench.spill", dir);
	snprintf(plain, sizeof plain, "%s/dd.bin", dir);
	snprintf(spec, sizeof spec, "spill=%s,spill_max=512MiB", spill);
	check(kvp_pool_open(spec, &pool), "pool");
	check(kvp_tenant_open(pool, "bench", "block=64,sinks=0", &t), "tenant");
	check(kvp_seq_open(t, &shape, &s), "sequence");
	fill(s);
	check(kvp_seq_stats(s, &mem), "stats");
	for (int r = 0; r < reps + 1; r++) {
		double t0 = bench_now(), t1, t2;
		check(kvp_seq_park(s), "park");
		t1 = bench_now();
		check(kvp_seq_unpark(s), "unpark");
		t2 = bench_now();
		if (r == 0) /* warm-up */
			continue;
		park_s = t1 - t0 < park_s ? t1 - t0 : park_s;
		unpark_s = t2 - t1 < unpark_s ? t2 - t1 : unpark_s;
	}
	check(kvp_seq_park(s), "park");
	check(kvp_seq_stats(s, &parked), "stats");
	check(kvp_seq_unpark(s), "unpark");
	dd_baseline((parked.bytes_spilled + (1u << 20) - 1) & ~(uint64_t)((1u << 20) - 1), reps, &dd_w, &dd_r);
	{
		double rec = (double)parked.bytes_spilled, cache = (double)mem.bytes_exact, dd_bytes;
		dd_bytes = (double)((parked.bytes_spilled + (1u << 20) - 1) & ~(uint64_t)((1u << 20) - 1));
		printf("spill file %s: %s I/O, %s buffers, crc32c %s\n", spill,
		       kvp_spill_is_direct(pool) ? "O_DIRECT" : "buffered",
		       kvp_spill_is_registered(pool) ? "registered" : "unregistered", kvp_crc32c_name());
		bench_header("Spill: 8 layers x 8 KV heads x 1024 tokens, d=128 fp32, block=64 (64 KiB records)");
		snprintf(config, sizeof config, "%.0f MiB cache, %.0f MiB records", cache / 1048576, rec / 1048576);
		bench_row(config, "park write", rec / park_s, dd_bytes / dd_w, 1.0 / 1048576, "MiB/s",
			  "dd oflag=direct bs=1M");
		bench_row(config, "unpark read+check", rec / unpark_s, dd_bytes / dd_r, 1.0 / 1048576, "MiB/s",
			  "dd iflag=direct bs=1M");
		bench_row(config, "park+unpark per MiB", (park_s + unpark_s) / (cache / 1048576),
			  (dd_w + dd_r) / (dd_bytes / 1048576), 1e3, "ms", "dd write+read per MiB");
	}
	kvp_pool_close(pool);
	rmdir(dir);
	return 0;
}
