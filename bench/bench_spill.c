/*
 * Spill device throughput and park/unpark latency, against dd on the same file system in the same run:
 *   - park: bytes of records written per second, against `dd oflag=direct` writing 1 MiB blocks into a
 *     written file beside the spill file;
 *   - unpark: bytes read (and checked) per second, against `dd iflag=direct` reading that file back;
 *   - park + unpark latency per MiB of cache, against dd writing and reading the same bytes;
 *   - a decode step's attention over a cold tier pressure spilled block by block (prefetched a layer
 *     ahead), against the same tokens in memory.
 * Shape: 8 layers, 8 KV heads, 32 query heads, d=128, fp32, block=64: 64 KiB records (17 pages).
 * KVP_BENCH_DIR picks the file system (default $TMPDIR or /var/tmp); KVP_BENCH_REPS the repetitions.
 *
 * Like for like: both sides overwrite written blocks. A fresh spill file is preallocated, and ext4
 * converts each unwritten extent on the first write into it, which made the first pass over the file
 * ~20% slower than dd's overwrites; so the spill file is written through once before timing, as dd's
 * file is. Both bypass the page cache. dd writes /dev/zero: copying real bytes from memory instead
 * slowed dd by ~25% (it copies in line with its I/O) and zeroes wrote no faster than random bytes here,
 * so /dev/zero is the stronger baseline. dd keeps one 1 MiB request in flight; the spill device up to
 * three quarters of spill_buffer, in requests of a quarter.
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

/* One dd write and one dd read of bytes (a multiple of 1 MiB) through the written plain file. */
static void dd_once(uint64_t bytes, double *write_s, double *read_s)
{
	char args[1400];
	unsigned mib = (unsigned)(bytes >> 20);
	snprintf(args, sizeof args, "if=/dev/zero of=%s bs=1M count=%u oflag=direct conv=notrunc", plain, mib);
	*write_s = dd_seconds(args);
	snprintf(args, sizeof args, "if=%s of=/dev/null bs=1M count=%u iflag=direct", plain, mib);
	*read_s = dd_seconds(args);
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

struct figures {
	double park_s, unpark_s, dd_w, dd_r;
	uint64_t cache, records, dd_bytes;
	int direct, registered;
};

/* One pool with the given staging buffer: ours and dd's alternate, best of each, so a noisy neighbour
 * hurts both alike. */
static void measure(const char *buffer, int reps, struct figures *f)
{
	const kvp_shape shape = { LAYERS, NH, NKV, D, 10000.0f, KVP_ROPE_HALF };
	kvp_stats mem = { .size = sizeof mem }, parked = { .size = sizeof parked };
	char spec[800], args[1400];
	kvp_pool *pool;
	kvp_tenant *t;
	kvp_seq *s;
	/* room for two parks: the warm-up below writes every page of it */
	snprintf(spec, sizeof spec, "spill=%s,spill_max=160MiB,spill_buffer=%s", spill, buffer);
	check(kvp_pool_open(spec, &pool), "pool");
	check(kvp_tenant_open(pool, "bench", "block=64,sinks=0", &t), "tenant");
	check(kvp_seq_open(t, &shape, &s), "sequence");
	fill(s);
	check(kvp_seq_stats(s, &mem), "stats");
	check(kvp_seq_park(s), "park");
	check(kvp_seq_stats(s, &parked), "stats");
	check(kvp_seq_unpark(s), "unpark");
	*f = (struct figures){ .park_s = 1e30, .unpark_s = 1e30, .dd_w = 1e30, .dd_r = 1e30,
			       .cache = mem.bytes_exact, .records = parked.bytes_spilled,
			       .dd_bytes = (parked.bytes_spilled + (1u << 20) - 1) & ~(uint64_t)((1u << 20) - 1),
			       .direct = kvp_spill_is_direct(pool), .registered = kvp_spill_is_registered(pool) };
	snprintf(args, sizeof args, "if=/dev/zero of=%s bs=1M count=%u", plain, (unsigned)(f->dd_bytes >> 20));
	dd_seconds(args); /* write the plain file once, so dd overwrites like the spill device does */
	for (int w = 0; w < 3; w++) { /* 3 x 68 MiB: every page of the spill file written once */
		check(kvp_seq_park(s), "park");
		check(kvp_seq_unpark(s), "unpark");
	}
	for (int r = 0; r < reps + 1; r++) {
		double t0 = bench_now(), t1, t2, w, rd;
		check(kvp_seq_park(s), "park");
		t1 = bench_now();
		check(kvp_seq_unpark(s), "unpark");
		t2 = bench_now();
		dd_once(f->dd_bytes, &w, &rd);
		if (r == 0) /* warm-up */
			continue;
		f->park_s = t1 - t0 < f->park_s ? t1 - t0 : f->park_s;
		f->unpark_s = t2 - t1 < f->unpark_s ? t2 - t1 : f->unpark_s;
		f->dd_w = w < f->dd_w ? w : f->dd_w;
		f->dd_r = rd < f->dd_r ? rd : f->dd_r;
	}
	unlink(plain);
	kvp_pool_close(pool);
}

static void report(const char *buffer, const struct figures *f)
{
	double rec = (double)f->records, cache = (double)f->cache, dd = (double)f->dd_bytes;
	char config[64];
	snprintf(config, sizeof config, "%.0f MiB, spill_buffer=%s", cache / 1048576, buffer);
	bench_row(config, "park write", rec / f->park_s, dd / f->dd_w, 1.0 / 1048576, "MiB/s", "dd oflag=direct bs=1M");
	bench_row(config, "unpark read+check", rec / f->unpark_s, dd / f->dd_r, 1.0 / 1048576, "MiB/s",
		  "dd iflag=direct bs=1M");
	bench_row(config, "park+unpark per MiB", (f->park_s + f->unpark_s) / (cache / 1048576),
		  (f->dd_w + f->dd_r) / (dd / 1048576), 1e3, "ms", "dd write+read per MiB");
}

/* ---- attention over a cold tier pressure spilled block by block, against the same cache in memory ----
 * Two tenants of one pool get the same tokens; "spill" has a quota of `percent` of what "mem" holds, so
 * its oldest cold blocks live on the device and every decode step's attention reads them back, each
 * layer prefetching the next one's. Best of reps steps of all layers each. */
#define COLD_SPEC "block=64,sinks=4,window=128,k=turboquant(bits=4),v=fp16"

static double step_seconds(kvp_seq *s, const float *q, float *out, int reps)
{
	double best = 1e30;
	for (int r = 0; r < reps + 1; r++) {
		double t0 = bench_now();
		for (uint32_t l = 0; l < LAYERS; l++)
			check(kvp_attend(s, l, q, out), "attend");
		if (r && bench_now() - t0 < best) /* the first is a warm-up */
			best = bench_now() - t0;
	}
	return best;
}

static void attention_vs_memory(unsigned percent, int reps)
{
	const kvp_shape shape = { LAYERS, NH, NKV, D, 10000.0f, KVP_ROPE_HALF };
	kvp_stats st = { .size = sizeof st };
	static float q[NH * D], out[NH * D];
	char spec[800], config[96];
	kvp_pool *pool;
	kvp_tenant *mem, *spilled;
	kvp_seq *a, *b;
	double t_mem, t_spill;
	for (int i = 0; i < NH * D; i++)
		q[i] = (float)(i % 17) * 0.01f;
	snprintf(spec, sizeof spec, "spill=%s,spill_max=512MiB", spill);
	check(kvp_pool_open(spec, &pool), "pool");
	check(kvp_tenant_open(pool, "mem", COLD_SPEC, &mem), "tenant");
	check(kvp_seq_open(mem, &shape, &a), "sequence");
	fill(a);
	check(kvp_tenant_stats(mem, &st), "stats");
	snprintf(spec, sizeof spec, COLD_SPEC ",quota=%llu",
		 (unsigned long long)((st.bytes_exact + st.bytes_compressed + st.bytes_meta) * percent / 100));
	check(kvp_tenant_open(pool, "spill", spec, &spilled), "tenant");
	check(kvp_seq_open(spilled, &shape, &b), "sequence");
	fill(b);
	t_mem = step_seconds(a, q, out, reps);
	t_spill = step_seconds(b, q, out, reps);
	check(kvp_tenant_stats(spilled, &st), "stats");
	snprintf(config, sizeof config, "quota %u%%, %.1f MiB spilled", percent,
		 (double)st.bytes_spilled / 1048576);
	bench_row(config, "attention step, all layers", t_spill, t_mem, 1e3, "ms", "all in memory");
	kvp_pool_close(pool);
}

int main(void)
{
	static const char *const buffers[] = { "2MiB", "8MiB" };
	struct figures f[2];
	const char *base = getenv("KVP_BENCH_DIR");
	int reps = bench_reps(5);

	if (!base || !*base)
		base = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	snprintf(dir, sizeof dir, "%s/kvpager-bench-XXXXXX", base);
	if (!mkdtemp(dir)) {
		perror(dir);
		return 1;
	}
	snprintf(spill, sizeof spill, "%s/bench.spill", dir);
	snprintf(plain, sizeof plain, "%s/dd.bin", dir);
	for (int i = 0; i < 2; i++)
		measure(buffers[i], reps, &f[i]);
	printf("spill file in %s: %s I/O, crc32c %s; records are %.0f MiB for %.0f MiB of cache\n", dir,
	       f[0].direct ? "O_DIRECT" : "buffered", kvp_crc32c_name(), (double)f[0].records / 1048576,
	       (double)f[0].cache / 1048576);
	bench_header("Spill: 8 layers x 8 KV heads x 1024 tokens, d=128 fp32, block=64 (64 KiB records)");
	for (int i = 0; i < 2; i++) {
		if (!f[i].registered)
			printf("(spill_buffer=%s: io_uring could not register it here; plain reads and writes)\n",
			       buffers[i]);
		report(buffers[i], &f[i]);
	}
	bench_header("Attention with a spilled, prefetched cold tier: 8 layers x 8 KV heads x 1024 tokens, d=128, "
		     COLD_SPEC);
	attention_vs_memory(90, reps);
	attention_vs_memory(75, reps);
	rmdir(dir);
	return 0;
}
