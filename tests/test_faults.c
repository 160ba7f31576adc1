/*
 * Spill faults. Write and read failures come from the test hook compiled into the device
 * (kvp_spill_inject): the I/O really happens and its completion is turned into EIO, or the write is
 * really submitted one page short. Corruption is real: the test rewrites the spill file on disk with
 * pwrite, either flipping payload bytes or copying another block's valid record over a slot.
 * Every test ends with the sequence usable or cleanly closable and every slot and byte given back.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "park_fixture.h"

TestSuite(faults, .fini = spill_fixture_fini);

/* The slot headers in the spill file, in file order. */
static size_t records_find(struct kvp_slot_header *h, uint64_t *page, size_t cap)
{
	int fd = open(spill_path, O_RDONLY);
	size_t n = 0;
	cr_assert_geq(fd, 0);
	for (uint64_t p = 0; n < cap && pread(fd, &h[n], sizeof *h, (off_t)(p * 4096)) == sizeof *h; p++)
		if (h[n].magic == KVP_SLOT_MAGIC)
			page[n++] = p;
	close(fd);
	return n;
}

static void file_write(uint64_t offset, const void *bytes, size_t n)
{
	int fd = open(spill_path, O_WRONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite(fd, bytes, n, (off_t)offset), (ssize_t)n);
	cr_assert_eq(fsync(fd), 0);
	close(fd);
}

static void assert_everything_given_back(void)
{
	kvp_stats st = park_tenant_stats();
	cr_assert_eq(kvp_spill_pages_used(pool), 0, "every slot is free");
	cr_assert_eq(st.bytes_spilled, 0);
	cr_assert_eq(st.bytes_exact, 0);
	cr_assert_eq(st.bytes_meta, 0);
	cr_assert_eq(st.tokens_retained, 0);
}

static void failed_write_leaves_the_sequence_in_memory(const char *spill_max, struct kvp_spill_faults f,
						      const char *says)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_stats full;
	kvp_seq *s;
	park_open(spill_max, "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 3);
	park_attend(s, before);
	full = park_tenant_stats();
	kvp_spill_inject(pool, &f);
	cr_assert_eq(kvp_seq_park(s), KVP_EIO);
	cr_assert(strstr(kvp_last_error(), says), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "nothing was parked"), "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_pages_used(pool), 0, "the slots of the failed park are free again");
	cr_assert_eq(park_tenant_stats().bytes_spilled, 0);
	cr_assert_eq(park_tenant_stats().bytes_exact, full.bytes_exact, "the blocks stay in memory");
	cr_assert_eq(park_tenant_stats().bytes_meta, full.bytes_meta, "no stub or table is left over");
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0, "and unchanged");
	park_fill(s, 100, 3, 4);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "the next park works: %s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(faults, a_failed_write_leaves_the_blocks_in_memory_and_reports_eio)
{
	failed_write_leaves_the_sequence_in_memory("16MiB", (struct kvp_spill_faults){ .fail_write = 1 }, "write of");
}

Test(faults, a_write_failing_after_earlier_batches_were_written_leaves_the_blocks_in_memory)
{
	/* 32 KiB halves hold 4 records each: the 5th request fails after 4 batches went out */
	failed_write_leaves_the_sequence_in_memory("16MiB,spill_buffer=64KiB",
						   (struct kvp_spill_faults){ .fail_write = 5 }, "write of");
}

Test(faults, a_short_write_leaves_the_blocks_in_memory_and_reports_eio)
{
	failed_write_leaves_the_sequence_in_memory("16MiB", (struct kvp_spill_faults){ .short_write = 1 },
						   "short write");
}

Test(faults, a_failed_read_keeps_the_slots_and_a_later_unpark_succeeds)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	float k[PARK_ROW] = { 0 };
	int32_t pos = 0;
	uint64_t pages, meta;
	kvp_seq *s;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 3);
	park_attend(s, before);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	pages = kvp_spill_pages_used(pool);
	meta = park_tenant_stats().bytes_meta;
	kvp_spill_inject(pool, &(struct kvp_spill_faults){ .fail_read = 1 });
	cr_assert_eq(kvp_seq_unpark(s), KVP_EIO);
	cr_assert(strstr(kvp_last_error(), "stays parked"), "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_pages_used(pool), pages, "the records are kept");
	cr_assert_eq(park_tenant_stats().bytes_exact, 0, "the blocks read so far are freed");
	cr_assert_eq(park_tenant_stats().bytes_meta, meta);
	cr_assert_eq(kvp_append(s, 0, 1, &pos, k, k), KVP_EINVAL, "still parked");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(faults, a_flipped_payload_byte_is_reported_as_corrupt)
{
	struct kvp_slot_header h[64];
	uint64_t page[64];
	unsigned char junk = 0x5a;
	kvp_seq *s;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 3);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(records_find(h, page, 64), PARK_LAYERS * PARK_KV * 7);
	file_write(page[9] * 4096 + 64 + 1000, &junk, 1);
	cr_assert_eq(kvp_seq_unpark(s), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "fails its checksum"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(s), KVP_ECORRUPT, "never garbage, however often it is asked");
	cr_assert_eq(park_tenant_stats().bytes_exact, 0);
	kvp_seq_close(s); /* the data is gone; closing still gives every byte back */
	assert_everything_given_back();
	park_close();
}

Test(faults, another_blocks_valid_record_in_a_slot_is_reported_as_corrupt)
{
	static unsigned char record[2 * 4096];
	struct kvp_slot_header h[64];
	uint64_t page[64], mine = UINT64_MAX, theirs = UINT64_MAX;
	kvp_seq *a, *b;
	int fd;
	size_t n;
	park_open("16MiB", "block=16,sinks=4");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &a), KVP_OK);
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &b), KVP_OK);
	park_fill(a, 0, 100, 3);
	park_fill(b, 0, 100, 4);
	cr_assert_eq(kvp_seq_park(a), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_park(b), KVP_OK, "%s", kvp_last_error());
	n = records_find(h, page, 64);
	for (size_t i = 0; i < n; i++)
		if (h[i].layer == 1 && h[i].kv_head == 0 && h[i].block_no == 3)
			*(mine == UINT64_MAX ? &mine : &theirs) = page[i]; /* a parked first: its record comes first */
	cr_assert_neq(theirs, UINT64_MAX);
	fd = open(spill_path, O_RDONLY);
	cr_assert_eq(pread(fd, record, sizeof record, (off_t)(theirs * 4096)), (ssize_t)sizeof record);
	close(fd);
	file_write(mine * 4096, record, sizeof record); /* a whole valid record, checksum and all */
	cr_assert_eq(kvp_seq_unpark(a), KVP_ECORRUPT);
	cr_assert(strstr(kvp_last_error(), "expected tenant"), "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_unpark(b), KVP_OK, "the other sequence is untouched: %s", kvp_last_error());
	kvp_seq_close(a);
	kvp_seq_close(b);
	assert_everything_given_back();
	park_close();
}

Test(faults, a_full_spill_file_behaves_like_full_memory)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *s;
	park_open("64KiB", "block=16,sinks=4"); /* 16 pages; the sequence needs 52 */
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 3);
	park_attend(s, before);
	cr_assert_eq(kvp_seq_park(s), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "spill file full"), "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_pages_used(pool), 0);
	cr_assert_eq(park_tenant_stats().bytes_spilled, 0);
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}

Test(faults, unpark_over_quota_stays_parked_until_memory_is_free)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *s, *hog;
	/* s takes 52 pages and ~110 KB, hog ~195 KB: both fit the quota, not both; the file is just s's, so
	 * pressure cannot spill even one of hog's blocks to make room */
	park_open("208KiB", "block=16,sinks=4,quota=288KiB");
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK);
	park_fill(s, 0, 100, 3);
	park_attend(s, before);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &hog), KVP_OK);
	park_fill(hog, 0, 180, 9);
	cr_assert_eq(kvp_seq_unpark(s), KVP_ENOMEM);
	cr_assert(strstr(kvp_last_error(), "quota"), "%s", kvp_last_error());
	cr_assert(strstr(kvp_last_error(), "spill file full"), "pressure tried to spill hog: %s", kvp_last_error());
	kvp_seq_close(hog);
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	kvp_seq_close(s);
	assert_everything_given_back();
	park_close();
}
