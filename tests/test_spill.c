/* The spill device: spec, the preallocated file, O_DIRECT and its fallback, and slot accounting. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "spill_fixture.h"

TestSuite(spill, .fini = spill_fixture_fini);

Test(spill, pool_preallocates_the_file_and_removes_it_at_close)
{
	struct stat st;
	kvp_pool *p;
	spill_fixture_open("8MiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_size, 8 << 20);
	cr_assert_geq((uint64_t)st.st_blocks * 512, 8u << 20, "allocated, not sparse");
	cr_assert_eq(kvp_spill_pages_total(p), (8 << 20) / 4096);
	cr_assert_eq(kvp_spill_pages_used(p), 0);
	cr_assert(kvp_spill_is_direct(p), "ext4 and tmpfs take O_DIRECT");
	kvp_pool_close(p);
	cr_assert_neq(stat(spill_path, &st), 0, "the pool created the file, so it removes it");
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, an_existing_file_is_reused_and_kept)
{
	struct stat st;
	kvp_pool *p;
	int fd;
	spill_fixture_open("1MiB", NULL);
	fd = open(spill_path, O_CREAT | O_WRONLY, 0600);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, "old", 3), 3);
	close(fd);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_size, 1 << 20);
	kvp_pool_close(p);
	cr_assert_eq(stat(spill_path, &st), 0, "a file the pool did not create is left in place");
	cr_assert_eq(spill_fixture_close(), 1);
}

Test(spill, refused_o_direct_falls_back_to_buffered_io_with_a_note)
{
	kvp_pool *p;
	spill_fixture_open("1MiB", NULL);
	kvp_spill_refuse_direct = 1; /* no file system here refuses O_DIRECT, so the hook plays one */
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_not(kvp_spill_is_direct(p));
	cr_assert(strstr(kvp_last_error(), "refused O_DIRECT"), "%s", kvp_last_error());
	kvp_pool_close(p);
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, bad_specs_name_what_was_wrong)
{
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("4KiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill_max=4096"), "%s", kvp_last_error());
	cr_assert_null(p);
	cr_assert_eq(kvp_pool_open("spill=/nonexistent-dir/x.spill,spill_max=1MiB", &p), KVP_EIO);
	cr_assert(strstr(kvp_last_error(), "/nonexistent-dir/x.spill"), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_open("spill=/dev/null,spill_max=1MiB", &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not a regular file"), "%s", kvp_last_error());
	cr_assert_eq(kvp_pool_open("spill=,spill_max=1MiB", &p), KVP_EINVAL);
	snprintf(spill_spec, sizeof spill_spec, "spill=%s,spill_max=1MiB,spill_buffer=4KiB", spill_path);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill_buffer=4096"), "%s", kvp_last_error());
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, slots_are_first_fit_runs_of_pages_and_come_back_when_freed)
{
	kvp_pool *p;
	struct kvp_spill *d;
	uint64_t a, b, c, e;
	spill_fixture_open("64KiB", NULL); /* 16 pages */
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	d = kvp_pool_from_handle(p)->spill;
	kvp_spill_lock(d);
	cr_assert_eq(kvp_spill_slot_alloc(d, 5, &a), KVP_OK);
	cr_assert_eq(kvp_spill_slot_alloc(d, 5, &b), KVP_OK);
	cr_assert_eq(kvp_spill_slot_alloc(d, 5, &c), KVP_OK);
	cr_assert_eq(a, 0);
	cr_assert_eq(b, 5);
	cr_assert_eq(c, 10);
	cr_assert_eq(kvp_spill_slot_alloc(d, 2, &e), KVP_ENOMEM, "one page is left");
	cr_assert(strstr(kvp_last_error(), "spill file full"), "%s", kvp_last_error());
	kvp_spill_slot_free(d, b, 5);
	cr_assert_eq(kvp_spill_slot_alloc(d, 6, &e), KVP_ENOMEM, "6 free pages, but not in one run");
	cr_assert_eq(kvp_spill_slot_alloc(d, 4, &e), KVP_OK);
	cr_assert_eq(e, 5, "the hole is reused");
	kvp_spill_slot_free(d, a, 5);
	kvp_spill_slot_free(d, c, 5);
	kvp_spill_slot_free(d, e, 4);
	kvp_spill_unlock(d);
	cr_assert_eq(kvp_spill_pages_used(p), 0);
	kvp_pool_close(p);
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, record_pages_cover_the_header_and_payload)
{
	cr_assert_eq(kvp_spill_record_pages(0), 1);
	cr_assert_eq(kvp_spill_record_pages(4096 - 64), 1);
	cr_assert_eq(kvp_spill_record_pages(4096 - 63), 2);
}
