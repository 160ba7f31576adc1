/*
 * The spill device: spec, the preallocated file, O_DIRECT and its fallback, slot accounting, and what
 * spill=PATH may name (a new path, a directory, a file this library left, a block device; never a
 * symbolic link or a foreign file).
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvpager.h"
#include "pager/pager.h"
#include "park_fixture.h"

TestSuite(spill, .fini = spill_fixture_fini);

Test(spill, pool_preallocates_the_file_and_removes_it_at_close)
{
	struct stat st;
	kvp_pool *p;
	spill_fixture_open("8MiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_size, (8 << 20) + 4096, "the slots and the label page after them");
	cr_assert_geq((uint64_t)st.st_blocks * 512, 8u << 20, "allocated, not sparse");
	cr_assert_eq(kvp_spill_pages_total(p), (8 << 20) / 4096);
	cr_assert_eq(kvp_spill_pages_used(p), 0);
	cr_assert(kvp_spill_is_direct(p), "ext4 and tmpfs take O_DIRECT");
	kvp_pool_close(p);
	cr_assert_neq(stat(spill_path, &st), 0, "the pool created the file, so it removes it");
	cr_assert_eq(spill_fixture_close(), 0);
}

/* Writes text to path (created with mode), replacing what was there. */
static void file_put(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, mode);
	cr_assert_geq(fd, 0, "%s", path);
	cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

/* The first bytes of path, NUL-terminated. */
static const char *file_head(const char *path)
{
	static char buf[64];
	int fd = open(path, O_RDONLY);
	ssize_t n;
	cr_assert_geq(fd, 0, "%s", path);
	n = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return buf;
}

/* A process that opens the pool and dies without closing it leaves the file behind, label and all. */
static void leave_a_file_as_a_crash_would(void)
{
	int status;
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		kvp_pool *p;
		_exit(kvp_pool_open(spill_spec, &p) == KVP_OK ? 0 : 1);
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child opened the pool");
	cr_assert_eq(access(spill_path, F_OK), 0, "the crashed pool's file is left");
}

Test(spill, a_file_left_by_a_crashed_process_is_reused_and_kept)
{
	struct stat st;
	kvp_pool *p;
	spill_fixture_open("1MiB", NULL);
	leave_a_file_as_a_crash_would();
	snprintf(spill_spec, sizeof spill_spec, "spill=%s,spill_max=2MiB", spill_path);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_size, (2 << 20) + 4096, "resized to the new spill_max");
	cr_assert_eq(kvp_spill_pages_total(p), 512);
	kvp_pool_close(p);
	cr_assert_eq(stat(spill_path, &st), 0, "a file the pool did not create is left in place");
	cr_assert_eq(spill_fixture_close(), 1);
}

Test(spill, a_created_file_is_private_whatever_the_umask)
{
	struct stat st;
	kvp_pool *p;
	mode_t old = umask(0);
	spill_fixture_open("1MiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	umask(old);
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_mode & 07777, 0600, "mode %04o", st.st_mode & 07777);
	kvp_pool_close(p);
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, a_symbolic_link_is_not_followed_and_its_target_is_untouched)
{
	char target[700], absent[700];
	struct stat st;
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("1MiB", NULL);
	snprintf(target, sizeof target, "%s/precious", spill_dir);
	file_put(target, "precious data", 0600);
	cr_assert_eq(chmod(target, 0666), 0);
	cr_assert_eq(symlink(target, spill_path), 0);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "a symbolic link: not followed"), "%s", kvp_last_error());
	cr_assert_null(p);
	cr_assert_str_eq(file_head(target), "precious data");
	cr_assert_eq(stat(target, &st), 0);
	cr_assert_eq(st.st_size, 13);
	cr_assert_eq(st.st_mode & 07777, 0666, "its mode is kept");
	/* a link to nothing: the target is not created through it */
	cr_assert_eq(unlink(spill_path), 0);
	snprintf(absent, sizeof absent, "%s/made-through-the-link", spill_dir);
	cr_assert_eq(symlink(absent, spill_path), 0);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert_neq(access(absent, F_OK), 0, "nothing was created at the link's target");
	cr_assert_eq(spill_fixture_close(), 2, "the target and the link");
}

Test(spill, a_foreign_file_is_refused_untouched)
{
	struct stat st;
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("1MiB", NULL);
	file_put(spill_path, "old", 0600);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not a spill file of this library"), "%s", kvp_last_error());
	cr_assert_null(p);
	cr_assert_str_eq(file_head(spill_path), "old");
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_size, 3);
	cr_assert_eq(spill_fixture_close(), 1);
}

Test(spill, a_spill_file_others_can_read_is_refused_untouched)
{
	struct stat st;
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("1MiB", NULL);
	leave_a_file_as_a_crash_would();
	cr_assert_eq(chmod(spill_path, 0644), 0);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "mode 0644 lets other users read the cache"), "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &st), 0);
	cr_assert_eq(st.st_mode & 07777, 0644);
	cr_assert_eq(spill_fixture_close(), 1);
}

Test(spill, a_fifo_is_refused_without_blocking, .timeout = 10)
{
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("1MiB", NULL);
	cr_assert_eq(mkfifo(spill_path, 0600), 0);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "not a regular file, a directory or a block device"), "%s", kvp_last_error());
	cr_assert_eq(spill_fixture_close(), 1);
}

Test(spill, a_too_small_spill_max_is_einval_and_touches_nothing)
{
	struct stat before, after;
	kvp_pool *p = (kvp_pool *)1;
	spill_fixture_open("1MiB", NULL);
	leave_a_file_as_a_crash_would();
	cr_assert_eq(stat(spill_path, &before), 0);
	snprintf(spill_spec, sizeof spill_spec, "spill=%s,spill_max=4KiB", spill_path);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert(strstr(kvp_last_error(), "spill_max=4096"), "%s", kvp_last_error());
	cr_assert_eq(stat(spill_path, &after), 0);
	cr_assert_eq(after.st_size, before.st_size, "not truncated");
	cr_assert_eq(after.st_blocks, before.st_blocks);
	cr_assert_eq(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
	cr_assert_eq(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec, "not written");
	cr_assert_eq(unlink(spill_path), 0);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_EINVAL);
	cr_assert_neq(access(spill_path, F_OK), 0, "no file is created for a refused spec");
	cr_assert_eq(spill_fixture_close(), 0);
}

Test(spill, close_removes_only_the_file_it_created)
{
	char moved[700];
	kvp_pool *p;
	spill_fixture_open("1MiB", NULL);
	cr_assert_eq(kvp_pool_open(spill_spec, &p), KVP_OK, "%s", kvp_last_error());
	snprintf(moved, sizeof moved, "%s/moved.spill", spill_dir);
	cr_assert_eq(rename(spill_path, moved), 0);
	file_put(spill_path, "someone else's", 0600);
	kvp_pool_close(p);
	cr_assert_str_eq(file_head(spill_path), "someone else's", "the file now at the path is not the pool's");
	cr_assert_eq(spill_fixture_close(), 2, "the moved file (the pool cannot find it) and the new one");
}

static int entries(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	cr_assert_not_null(d);
	while ((e = readdir(d)))
		n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
	closedir(d);
	return n;
}

Test(spill, a_directory_holds_an_unnamed_file_that_parks_and_unparks)
{
	static float before[PARK_LAYERS * PARK_OUT], after[PARK_LAYERS * PARK_OUT];
	kvp_seq *s;
	spill_fixture_open("1MiB", NULL);
	snprintf(spill_spec, sizeof spill_spec, "spill=%s,spill_max=4MiB", spill_dir);
	cr_assert_eq(kvp_pool_open(spill_spec, &pool), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_spill_pages_total(pool), 1024);
	cr_assert_eq(kvp_tenant_open(pool, "t", "block=16,sinks=4", &tenant), KVP_OK, "%s", kvp_last_error());
	cr_assert_eq(kvp_seq_open(tenant, &park_shape, &s), KVP_OK, "%s", kvp_last_error());
	park_fill(s, 0, 100, 3);
	park_attend(s, before);
	cr_assert_eq(kvp_seq_park(s), KVP_OK, "%s", kvp_last_error());
	cr_assert_gt(kvp_spill_pages_used(pool), 0);
	cr_assert_eq(entries(spill_dir), 0, "the file has no name");
	cr_assert_eq(kvp_seq_unpark(s), KVP_OK, "%s", kvp_last_error());
	park_attend(s, after);
	cr_assert_eq(memcmp(before, after, sizeof before), 0);
	kvp_pool_close(pool);
	cr_assert_eq(spill_fixture_close(), 0, "nothing to remove, nothing left");
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
