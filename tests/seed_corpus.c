/*
 * Writes the fuzz targets' seed corpora (`make fuzz-seeds`; the files are committed in tests/corpus):
 *   fuzz_kvtria/  .kvtria files written by kvp_tria_stats_write, each read back by kvp_tria_stats_read;
 *   fuzz_slot/    spill records the spill device wrote for fuzz_slot's block (tests/fuzz_slot_stub.h),
 *                 read back from the spill file, with fuzz_slot's mode byte in front;
 *   fuzz_config/  specs each parser accepts, with fuzz_config's selector byte in front;
 *   fuzz_codec/   tokens each of fuzz_codec's codecs encoded (a group of them), with its selector byte.
 * Without seeds the fuzzer rarely gets past the first check: a .kvtria file must have exactly the size
 * its header implies, and a spill record must match its stub's identity.
 * Usage: seed_corpus DIR (DIR/<target>/ must exist). Exits 1, saying why, when anything is refused.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "policies/policy.h"
#include "tests/fuzz_codec_table.h"
#include "tests/fuzz_slot_stub.h"

static const char *out_dir;

static void die(const char *what)
{
	fprintf(stderr, "seed_corpus: %s: %s\n", what, kvp_last_error());
	exit(1);
}

static void seed_write(const char *target, const char *name, unsigned char mode, const void *bytes, size_t n)
{
	char path[1024];
	FILE *f;
	snprintf(path, sizeof path, "%s/%s/%s", out_dir, target, name);
	if (!(f = fopen(path, "wb")) || fputc(mode, f) == EOF || fwrite(bytes, 1, n, f) != n || fclose(f)) {
		perror(path);
		exit(1);
	}
}

/* ---- .kvtria ---- */

static void kvtria_seed(const char *name, kvp_shape shape)
{
	char path[1024];
	struct kvp_tria_stats st, back;
	size_t n = (size_t)shape.n_layers * shape.n_heads * shape.head_dim / 2;
	snprintf(path, sizeof path, "%s/fuzz_kvtria/%s", out_dir, name);
	if (kvp_tria_stats_alloc(&st, shape.n_layers, shape.n_heads, shape.head_dim, shape.rope_layout,
				 shape.rope_theta) != KVP_OK)
		die(name);
	for (size_t i = 0; i < n; i++) { /* |q_mean| below q_abs_mean, as calibration gives */
		st.mean_re[i] = 0.01f * (float)(i % 7) - 0.03f;
		st.mean_im[i] = 0.02f * (float)(i % 5) - 0.04f;
		st.abs_mean[i] = 0.1f + 0.05f * (float)(i % 3);
	}
	if (kvp_tria_stats_write(path, &st) != KVP_OK)
		die(path);
	if (kvp_tria_stats_read(path, &shape, &back) != KVP_OK)
		die(path);
	kvp_tria_stats_free(&back);
	kvp_tria_stats_free(&st);
}

static void kvtria_seeds(void)
{
	kvtria_seed("1x1x8-half.kvtria", (kvp_shape){ 1, 1, 1, 8, 1e4f, KVP_ROPE_HALF });
	kvtria_seed("2x4x8-interleaved.kvtria", (kvp_shape){ 2, 4, 2, 8, 1e4f, KVP_ROPE_INTERLEAVED });
	kvtria_seed("2x2x16-half.kvtria", (kvp_shape){ 2, 2, 1, 16, 5e5f, KVP_ROPE_HALF });
	kvtria_seed("1x2x4-interleaved.kvtria", (kvp_shape){ 1, 2, 2, 4, 1e6f, KVP_ROPE_INTERLEAVED });
}

/* ---- spill records ---- */

/* The record the device writes for slot's block, as it lies in the file. */
static void record_written(struct kvp_pool_obj *pool, const char *file, struct slot_stub *slot, unsigned char *rec,
			   size_t n)
{
	struct kvp_spill_io io = { &slot->stub, &slot->block };
	int fd;
	kvp_spill_lock(pool->spill);
	if (kvp_spill_slot_alloc(pool->spill, slot->stub.pages, &slot->stub.first_page) != KVP_OK)
		die("slot");
	kvp_spill_unlock(pool->spill);
	if (kvp_spill_write(pool->spill, &io, 1, SLOT_DIM) != KVP_OK)
		die("spill write");
	if ((fd = open(file, O_RDONLY)) < 0 || pread(fd, rec, n, (off_t)(slot->stub.first_page * KVP_SPILL_PAGE)) != (ssize_t)n) {
		perror(file);
		exit(1);
	}
	close(fd);
}

static void slot_seeds(void)
{
	char dir[] = "/tmp/kvp-seeds-XXXXXX", file[64], spec[128];
	static struct slot_stub slot;
	unsigned char rec[sizeof slot.stub.header + sizeof slot.kv];
	kvp_pool *pool;
	if (!mkdtemp(dir)) {
		perror(dir);
		exit(1);
	}
	snprintf(file, sizeof file, "%s/seed.spill", dir);
	snprintf(spec, sizeof spec, "spill=%s,spill_max=64KiB", file);
	if (kvp_pool_open(spec, &pool) != KVP_OK)
		die(spec);
	slot_stub_init(&slot);
	record_written(kvp_pool_from_handle(pool), file, &slot, rec, sizeof rec);
	if (slot.stub.header.crc != slot.written_crc) {
		fprintf(stderr, "seed_corpus: the device wrote CRC %08x, fuzz_slot_stub.h expects %08x\n",
			slot.stub.header.crc, slot.written_crc);
		exit(1);
	}
	seed_write("fuzz_slot", "record-as-written", 0, rec, sizeof rec);
	seed_write("fuzz_slot", "record-crc-by-harness", 1, rec, sizeof rec);
	/* another generation of the same block: a valid record that fails the identity check */
	slot_stub_init(&slot);
	slot.stub.header.generation = 98;
	record_written(kvp_pool_from_handle(pool), file, &slot, rec, sizeof rec);
	seed_write("fuzz_slot", "record-other-generation", 1, rec, sizeof rec);
	kvp_pool_close(pool);
	rmdir(dir);
}

/* ---- specs ---- */

static void spec_seed(const char *name, unsigned char which, const char *spec)
{
	static const kvp_shape shape = { 2, 4, 2, 64, 1e4f, KVP_ROPE_HALF };
	struct kvp_tenant_config cfg;
	uint64_t quota = 0;
	kvp_codec *c;
	kvp_policy *p;
	kvp_status st = which == 0   ? kvp_tenant_config_parse(&cfg, &quota, spec)
			: which == 1 ? kvp_codec_open(spec, 64, &c)
				     : kvp_policy_open(spec, &shape, &p);
	if (st != KVP_OK)
		die(spec);
	if (which == 1)
		kvp_codec_close(c);
	else if (which == 2)
		kvp_policy_close(p);
	seed_write("fuzz_config", name, which, spec, strlen(spec));
}

static void config_seeds(void)
{
	spec_seed("tenant-triattention", 0, "quota=1GiB,block=64,sinks=4,window=128,policy=triattention(budget=2048,"
		  "every=128,select=per_layer_head),k=spark(keep=0.75)|turboquant(bits=3),v=turboquant(bits=3),gate=mrl");
	spec_seed("tenant-ladder", 0, "block=32,store=fp16,k=kivi(bits=2),v=kivi(bits=2),gate=entropy,"
		  "ladder=(4:1.0,3:0.5,2:0.25),policy=h2o(heavy=0.1,recent=0.1),pin_prompt=1");
	spec_seed("codec-turboquant", 1, "turboquant(bits=2,qjl=1,seed=7,outliers=8,outlier_bits=3)");
	spec_seed("codec-stack", 1, "spark(keep=0.5,recover=avg)|turboquant(bits=4)");
	spec_seed("codec-kivi", 1, "kivi(bits=4,group=32)");
	spec_seed("policy-streaming", 2, "streaming(sinks=4,window=1024)");
	spec_seed("policy-h2o", 2, "h2o(heavy=0.1,recent=0.1)");
	spec_seed("policy-triattention", 2, "triattention(ratio=0.25,every=64,offsets=10,aggregate=max,"
		  "select=union,stats=online,pin_prompt=0)");
}

/* ---- codes ---- */

static void codec_seeds(void)
{
	static float x[FUZZ_CODEC_TOKENS * 128];
	static unsigned char bytes[FUZZ_CODEC_TOKENS * 512];

	for (size_t i = 0; i < FUZZ_CODECS; i++) {
		uint32_t n = 8; /* or a whole group where a group is more */
		char name[32];
		kvp_codec *c = fuzz_codec_encoded(i, &n, x, bytes, sizeof bytes);
		if (!c)
			die(fuzz_codecs[i].spec);
		snprintf(name, sizeof name, "codec-%zu", i);
		seed_write("fuzz_codec", name, (unsigned char)i, bytes, kvp_codec_bytes(c, n));
		kvp_codec_close(c);
	}
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: seed_corpus DIR (with DIR/fuzz_kvtria, DIR/fuzz_slot, DIR/fuzz_config, "
			"DIR/fuzz_codec)\n");
		return 2;
	}
	out_dir = argv[1];
	kvtria_seeds();
	slot_seeds();
	config_seeds();
	codec_seeds();
	return 0;
}
