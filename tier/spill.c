/*
 * The spill device (see spill.h): the file, the slot allocator, and record I/O through io_uring with
 * batched submissions into one registered staging buffer.
 *
 * Why a staging buffer instead of I/O straight from block memory: O_DIRECT needs 4 KiB aligned addresses
 * and lengths, block memory comes from jemalloc at 64-byte alignment, and a registered buffer saves the
 * kernel pinning pages on every request. The copy costs far less than the device.
 */
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/crc32c.h"
#include "pager/pager.h"

/* io_uring fills read buffers from the kernel, which valgrind's memcheck (3.19) does not see: tell it, so
 * that the plugin test under valgrind reports real errors only. A no-op without valgrind's header. */
#if defined(__has_include)
#if __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#endif
#endif
#ifndef VALGRIND_MAKE_MEM_DEFINED
#define VALGRIND_MAKE_MEM_DEFINED(p, n) ((void)(p), (void)(n))
#endif

#define RING_ENTRIES 64
#define ASYNC_ENTRIES 256
#define STAGING_MIN (64u << 10)
#define MIN_PAGES 16
/* Staging is cut in SLICES batches that rotate: up to SLICES - 1 on the device while the CPU packs or
 * checks one. Measured on bench_spill with 64 KiB records: 4 beat 2 (the device idled while a half was
 * checked: unpark -15%) and 8 (requests of a quarter MiB with the default 2 MiB buffer: -5%). */
#define SLICES 4

int kvp_spill_refuse_direct;

/* Where the file came from: what close may do with it. */
enum spill_origin { ORIGIN_UNNAMED, ORIGIN_CREATED, ORIGIN_REUSED, ORIGIN_DEVICE };

struct kvp_spill {
	int fd, direct;
	enum spill_origin origin;
	dev_t dev; /* the file's identity, for ORIGIN_CREATED's removal */
	ino_t ino;
	char path[4096];
	uint64_t pages;
	pthread_mutex_t lock; /* bitmap, counters, stubs and twins (block.c) */
	uint64_t *bitmap, used, hint;
	uint64_t next_id; /* tenant and sequence ids, and record generations */
	struct kvp_twin_map twins;
	pthread_mutex_t ring_lock; /* ring, staging, faults */
	struct io_uring ring;
	unsigned char *staging;
	size_t staging_cap, staging_min; /* staging_min: spill_buffer=, the size it starts at */
	int registered;
	struct kvp_spill_faults faults;
	/* The second ring: single-record reads that outlive the call that submitted them (restore.c).
	 * Separate from the first so a park waiting on its batches never takes another's completion. */
	pthread_mutex_t aring_lock;
	struct io_uring aring;
};

/* ---- the file ----
 * What spill=PATH may name (include/kvpager.h states the same rules):
 *   - a directory: an unnamed file in it (O_TMPFILE), so there is nothing to remove at close and nothing
 *     left behind by a crash;
 *   - a path that does not exist: a file created there (O_EXCL | O_NOFOLLOW, mode 0600), removed at close
 *     only while the path still names that very file (device and inode), never whatever took its place;
 *   - a block device: used as it is, and kept;
 *   - an existing regular file: only one this library made (it carries the label below: say one left by
 *     a process that crashed), owned by this user and closed to everyone else (no group or other
 *     permission bits); its old contents are discarded, and it is kept at close;
 *   - anything else (a symbolic link, never followed; a FIFO; a foreign file): KVP_EINVAL, untouched.
 * Everything is checked before anything changes: a refused spec (spill_max too small included) creates,
 * truncates and writes nothing.
 *
 * The label: the page after a regular file's slots begins with LABEL_MAGIC. It sits at the end, so a
 * slot's page number is its offset in the file divided by the page size, as in a block device.
 */
#define LABEL_MAGIC "kvpager spill file, version 1\n"

static kvp_status refuse(const struct kvp_spill *d, const char *why)
{
	return kvp_fail(KVP_EINVAL, "spill=%s: %s", d->path, why);
}

static kvp_status fail_errno(const struct kvp_spill *d, const char *what)
{
	return kvp_fail(KVP_EIO, "spill=%s: %s%s%s", d->path, what, *what ? ": " : "", strerror(errno));
}

/* An existing regular file may be reused only when this library made it for this user alone. */
static kvp_status check_label(const struct kvp_spill *d, const struct stat *st)
{
	char label[sizeof LABEL_MAGIC - 1];
	if (st->st_uid != geteuid())
		return kvp_fail(KVP_EINVAL, "spill=%s: owned by uid %u, not this process's %u", d->path,
				(unsigned)st->st_uid, (unsigned)geteuid());
	if (st->st_mode & 077)
		return kvp_fail(KVP_EINVAL, "spill=%s: mode %04o lets other users read the cache (chmod 600 it)",
				d->path, (unsigned)(st->st_mode & 07777));
	if (st->st_size < KVP_SPILL_PAGE || st->st_size % KVP_SPILL_PAGE ||
	    pread(d->fd, label, sizeof label, st->st_size - KVP_SPILL_PAGE) != (ssize_t)sizeof label ||
	    memcmp(label, LABEL_MAGIC, sizeof label))
		return refuse(d, "an existing file that is not a spill file of this library: refused, not "
			      "overwritten (name a new path or a directory)");
	return KVP_OK;
}

/* A block device or a labelled file at the path lstat described in lst, opened without following it. */
static kvp_status open_existing(struct kvp_spill *d, const struct stat *lst)
{
	struct stat st;
	d->fd = open(d->path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
	if (d->fd < 0)
		return errno == ELOOP ? refuse(d, "a symbolic link: not followed") : fail_errno(d, "");
	if (fstat(d->fd, &st) != 0)
		return fail_errno(d, "fstat");
	if (st.st_dev != lst->st_dev || st.st_ino != lst->st_ino)
		return refuse(d, "replaced while it was being opened");
	d->dev = st.st_dev;
	d->ino = st.st_ino;
	if (S_ISBLK(st.st_mode)) {
		d->origin = ORIGIN_DEVICE;
		return KVP_OK;
	}
	d->origin = ORIGIN_REUSED;
	return check_label(d, &st);
}

static kvp_status open_unnamed(struct kvp_spill *d)
{
	d->fd = open(d->path, O_TMPFILE | O_RDWR | O_EXCL | O_CLOEXEC, 0600);
	if (d->fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR))
		return kvp_fail(KVP_EUNSUPPORTED, "spill=%s: this file system cannot hold an unnamed file "
				"(O_TMPFILE); name a file in the directory instead", d->path);
	if (d->fd < 0)
		return fail_errno(d, "");
	d->origin = ORIGIN_UNNAMED;
	return KVP_OK;
}

static kvp_status open_new(struct kvp_spill *d)
{
	struct stat st;
	d->fd = open(d->path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (d->fd < 0)
		return fail_errno(d, "");
	d->origin = ORIGIN_CREATED;
	if (fstat(d->fd, &st) != 0)
		return fail_errno(d, "fstat");
	d->dev = st.st_dev;
	d->ino = st.st_ino;
	return KVP_OK;
}

static kvp_status open_file(struct kvp_spill *d)
{
	struct stat st;
	if (lstat(d->path, &st) != 0)
		return errno == ENOENT ? open_new(d) : fail_errno(d, "");
	if (S_ISDIR(st.st_mode))
		return open_unnamed(d);
	if (S_ISLNK(st.st_mode))
		return refuse(d, "a symbolic link: not followed (name its target)");
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		return refuse(d, "not a regular file, a directory or a block device");
	return open_existing(d, &st);
}

/* Only the file this pool created, and only while the path still names it: it may have been moved away
 * and something else put in its place. */
static void remove_created(const struct kvp_spill *d)
{
	struct stat st;
	if (d->origin == ORIGIN_CREATED && lstat(d->path, &st) == 0 && st.st_dev == d->dev && st.st_ino == d->ino)
		unlink(d->path);
}

/* The page after the slots, written before O_DIRECT is on (it needs no aligned buffer then). */
static kvp_status label_write(struct kvp_spill *d, uint64_t bytes)
{
	char page[KVP_SPILL_PAGE] = LABEL_MAGIC; /* the rest zeros */
	if (pwrite(d->fd, page, sizeof page, (off_t)bytes) != (ssize_t)sizeof page)
		return fail_errno(d, "writing the label");
	return KVP_OK;
}

/* O_DIRECT where the file system takes it (set after the open, so a refusal never costs a second open of
 * the path); buffered otherwise. */
static void direct_enable(struct kvp_spill *d, int refuse)
{
	int flags = fcntl(d->fd, F_GETFL);
	d->direct = !refuse && flags >= 0 && fcntl(d->fd, F_SETFL, flags | O_DIRECT) == 0;
}

/* Regular files are preallocated so a park never waits for block allocation or finds the disk full; a
 * block device is used as it is, up to spill_max. */
static kvp_status size_file(struct kvp_spill *d, uint64_t max_bytes)
{
	struct stat st;
	uint64_t bytes = max_bytes / KVP_SPILL_PAGE * KVP_SPILL_PAGE;
	if (fstat(d->fd, &st) != 0)
		return fail_errno(d, "fstat");
	if (S_ISBLK(st.st_mode)) {
		uint64_t dev = 0;
		if (ioctl(d->fd, BLKGETSIZE64, &dev) != 0)
			return fail_errno(d, "device size");
		bytes = dev < bytes ? dev / KVP_SPILL_PAGE * KVP_SPILL_PAGE : bytes;
		if (bytes / KVP_SPILL_PAGE < MIN_PAGES)
			return kvp_fail(KVP_EINVAL, "spill=%s: the device holds %llu bytes; at least %u are needed",
					d->path, (unsigned long long)dev, MIN_PAGES * KVP_SPILL_PAGE);
	} else if (ftruncate(d->fd, 0) != 0 || fallocate(d->fd, 0, 0, (off_t)(bytes + KVP_SPILL_PAGE)) != 0) {
		int e = errno;
		if (e == EOPNOTSUPP && ftruncate(d->fd, (off_t)(bytes + KVP_SPILL_PAGE)) == 0)
			kvp_fail(KVP_OK, "spill=%s: the file system cannot preallocate; the file is sparse", d->path);
		else
			return kvp_fail(e == ENOSPC ? KVP_ENOMEM : KVP_EIO, "spill=%s: reserving %llu bytes: %s",
					d->path, (unsigned long long)bytes + KVP_SPILL_PAGE, strerror(e));
	}
	d->pages = bytes / KVP_SPILL_PAGE;
	return S_ISBLK(st.st_mode) ? KVP_OK : label_write(d, bytes);
}

/* ---- the ring and its staging buffer ---- */

static kvp_status staging_reserve(struct kvp_spill *d, size_t bytes)
{
	struct iovec iov;
	void *p;
	if (bytes <= d->staging_cap)
		return KVP_OK;
	if (bytes < d->staging_min)
		bytes = d->staging_min;
	if (posix_memalign(&p, KVP_SPILL_PAGE, bytes) != 0)
		return kvp_fail(KVP_ENOMEM, "spill: no memory for a %zu-byte staging buffer", bytes);
	if (d->registered)
		io_uring_unregister_buffers(&d->ring);
	free(d->staging);
	d->staging = p;
	d->staging_cap = bytes;
	iov.iov_base = p;
	iov.iov_len = bytes;
	/* Registration can fail under a small RLIMIT_MEMLOCK; plain reads and writes still work. */
	d->registered = io_uring_register_buffers(&d->ring, &iov, 1) == 0;
	return KVP_OK;
}

static kvp_status ring_open(struct kvp_spill *d)
{
	int r = io_uring_queue_init(RING_ENTRIES, &d->ring, 0);
	if (r >= 0 && (r = io_uring_queue_init(ASYNC_ENTRIES, &d->aring, 0)) < 0)
		io_uring_queue_exit(&d->ring);
	if (r < 0)
		return kvp_fail(KVP_EUNSUPPORTED, "spill=%s: io_uring is not available here (io_uring_queue_init: %s)",
				d->path, strerror(-r));
	if (staging_reserve(d, d->staging_min) != KVP_OK) {
		io_uring_queue_exit(&d->ring);
		io_uring_queue_exit(&d->aring);
		return KVP_ENOMEM;
	}
	return KVP_OK;
}

static void device_free(struct kvp_spill *d)
{
	if (d->fd >= 0) {
		remove_created(d);
		close(d->fd);
	}
	free(d->bitmap);
	free(d->staging);
	free(d->twins.keys);
	free(d->twins.vals);
	free(d);
}

kvp_status kvp_spill_open(struct kvp_pool_obj *pool, const char *path, unsigned path_len, uint64_t max_bytes,
			  uint64_t buffer_bytes)
{
	struct kvp_spill *d;
	kvp_status st;
	int refuse_direct = kvp_spill_refuse_direct; /* the test hook serves this open, whatever happens */
	kvp_spill_refuse_direct = 0;
	if (buffer_bytes < STAGING_MIN || buffer_bytes > (1u << 30))
		return kvp_fail(KVP_EINVAL, "spill_buffer=%llu: between %u and %u bytes",
				(unsigned long long)buffer_bytes, STAGING_MIN, 1u << 30);
	if (!(d = calloc(1, sizeof *d)))
		return kvp_fail(KVP_ENOMEM, "spill: out of memory");
	/* SLICES slices of whole pages */
	d->staging_min = (buffer_bytes + SLICES * KVP_SPILL_PAGE - 1) / (SLICES * KVP_SPILL_PAGE) * (SLICES * KVP_SPILL_PAGE);
	if (!path_len || path_len >= sizeof d->path) {
		free(d);
		return kvp_fail(KVP_EINVAL, "spill=: a path of 1..%zu characters is required", sizeof d->path - 1);
	}
	memcpy(d->path, path, path_len);
	d->fd = -1;
	if (max_bytes / KVP_SPILL_PAGE < MIN_PAGES) { /* before the path is touched */
		free(d);
		return kvp_fail(KVP_EINVAL, "spill_max=%llu: at least %u bytes are needed",
				(unsigned long long)max_bytes, MIN_PAGES * KVP_SPILL_PAGE);
	}
	if ((st = open_file(d)) != KVP_OK || (st = size_file(d, max_bytes)) != KVP_OK) {
		device_free(d);
		return st;
	}
	direct_enable(d, refuse_direct);
	if (!d->direct)
		kvp_fail(KVP_OK, "spill=%s: the file system refused O_DIRECT; using buffered I/O", d->path);
	if (!(d->bitmap = calloc((d->pages + 63) / 64, sizeof *d->bitmap))) {
		device_free(d);
		return kvp_fail(KVP_ENOMEM, "spill: out of memory for the slot map");
	}
	if ((st = ring_open(d)) != KVP_OK) {
		device_free(d);
		return st;
	}
	pthread_mutex_init(&d->lock, NULL);
	pthread_mutex_init(&d->ring_lock, NULL);
	pthread_mutex_init(&d->aring_lock, NULL);
	d->next_id = 1;
	pool->spill = d;
	return KVP_OK;
}

void kvp_spill_close(struct kvp_pool_obj *pool)
{
	struct kvp_spill *d = pool->spill;
	if (!d)
		return;
	if (d->registered)
		io_uring_unregister_buffers(&d->ring);
	io_uring_queue_exit(&d->ring);
	io_uring_queue_exit(&d->aring);
	pthread_mutex_destroy(&d->lock);
	pthread_mutex_destroy(&d->ring_lock);
	pthread_mutex_destroy(&d->aring_lock);
	pool->spill = NULL;
	device_free(d);
}

/* What the device does, for tests and benchmarks (the pager's hooks take the pool's handle). */
int kvp_spill_device_direct(const struct kvp_spill *d)
{
	return d && d->direct;
}

int kvp_spill_device_registered(const struct kvp_spill *d)
{
	return d && d->registered;
}

uint64_t kvp_spill_device_pages_used(struct kvp_spill *d)
{
	uint64_t n;
	if (!d)
		return 0;
	pthread_mutex_lock(&d->lock);
	n = d->used;
	pthread_mutex_unlock(&d->lock);
	return n;
}

uint64_t kvp_spill_device_pages_total(const struct kvp_spill *d)
{
	return d ? d->pages : 0;
}

void kvp_spill_device_inject(struct kvp_spill *d, const struct kvp_spill_faults *f)
{
	if (!d)
		return;
	pthread_mutex_lock(&d->ring_lock);
	d->faults = *f;
	pthread_mutex_unlock(&d->ring_lock);
}

void kvp_spill_lock(struct kvp_spill *d)
{
	pthread_mutex_lock(&d->lock);
}

void kvp_spill_unlock(struct kvp_spill *d)
{
	pthread_mutex_unlock(&d->lock);
}

uint64_t kvp_spill_next_id(struct kvp_spill *d)
{
	return d->next_id++;
}

struct kvp_twin_map *kvp_spill_twins(struct kvp_spill *d)
{
	return &d->twins;
}

/* ---- slots: a bitmap of pages, first fit from where the last allocation ended ---- */

static int page_used(const struct kvp_spill *d, uint64_t p)
{
	return (d->bitmap[p / 64] >> (p % 64)) & 1;
}

static void pages_mark(struct kvp_spill *d, uint64_t first, uint64_t n, int used)
{
	for (uint64_t p = first; p < first + n; p++) {
		if (used)
			d->bitmap[p / 64] |= 1ull << (p % 64);
		else
			d->bitmap[p / 64] &= ~(1ull << (p % 64));
	}
}

static uint64_t run_find(const struct kvp_spill *d, uint64_t from, uint64_t want)
{
	uint64_t run = 0;
	for (uint64_t p = from; p < d->pages; p++) {
		if (p % 64 == 0 && d->bitmap[p / 64] == UINT64_MAX) { /* skip full words */
			run = 0;
			p += 63;
			continue;
		}
		run = page_used(d, p) ? 0 : run + 1;
		if (run == want)
			return p + 1 - want;
	}
	return UINT64_MAX;
}

kvp_status kvp_spill_slot_alloc(struct kvp_spill *d, uint64_t pages, uint64_t *first)
{
	uint64_t at = UINT64_MAX;
	if (pages <= d->pages - d->used) {
		at = run_find(d, d->hint, pages);
		if (at == UINT64_MAX && d->hint)
			at = run_find(d, 0, pages);
	}
	if (at == UINT64_MAX)
		return kvp_fail(KVP_ENOMEM, "spill file full: no run of %llu free pages (%llu of %llu in use)",
				(unsigned long long)pages, (unsigned long long)d->used, (unsigned long long)d->pages);
	pages_mark(d, at, pages, 1);
	d->used += pages;
	d->hint = at + pages < d->pages ? at + pages : 0;
	*first = at;
	return KVP_OK;
}

void kvp_spill_slot_free(struct kvp_spill *d, uint64_t first, uint64_t pages)
{
	pages_mark(d, first, pages, 0);
	d->used -= pages;
}

uint64_t kvp_spill_record_pages(uint64_t payload)
{
	return (sizeof(struct kvp_slot_header) + payload + KVP_SPILL_PAGE - 1) / KVP_SPILL_PAGE;
}

void kvp_spill_block_image(const struct kvp_block *b, uint32_t dim, struct kvp_block_image *im)
{
	/* Opaque bytes: whatever a block holds (exact rows or codec bytes), the one allocation its K and V
	 * live in is what spills; its positions stay in memory (the header, or the stub of a parked block). */
	(void)dim;
	im->part[0] = NULL;
	im->bytes[0] = 0;
	im->part[1] = b->k;
	im->bytes[1] = b->data_size;
}

/* ---- records ---- */

static size_t record_bytes(const struct kvp_spilled *stub)
{
	return (size_t)stub->pages * KVP_SPILL_PAGE;
}

/* Header, image, padding into staging at dst; the header's crc covers the rest of the record's bytes. */
static void record_pack(struct kvp_spilled *stub, const struct kvp_block *block, uint32_t dim,
			unsigned char *dst)
{
	struct kvp_block_image im;
	size_t at = sizeof stub->header;
	kvp_spill_block_image(block, dim, &im);
	for (int i = 0; i < KVP_IMAGE_PARTS; i++) {
		if (im.bytes[i])
			memcpy(dst + at, im.part[i], im.bytes[i]);
		at += im.bytes[i];
	}
	memset(dst + at, 0, record_bytes(stub) - at);
	stub->header.crc = 0;
	memcpy(dst, &stub->header, sizeof stub->header);
	stub->header.crc = kvp_crc32c(0, dst + 4, at - 4);
	memcpy(dst, &stub->header, sizeof stub->header.crc);
}

kvp_status kvp_spill_record_unpack(const struct kvp_spilled *stub, struct kvp_block *block, uint32_t dim,
				   const unsigned char *src)
{
	struct kvp_slot_header h;
	struct kvp_block_image im;
	size_t at = sizeof h;
	memcpy(&h, src, sizeof h);
	if (kvp_crc32c(0, src + 4, sizeof h - 4 + stub->header.payload) != h.crc)
		return kvp_fail(KVP_ECORRUPT, "spill: the record at page %llu fails its checksum",
				(unsigned long long)stub->first_page);
	if (memcmp(&h, &stub->header, sizeof h) != 0)
		return kvp_fail(KVP_ECORRUPT, "spill: the record at page %llu holds tenant %llu, sequence %llu, "
				"layer %u, KV head %u, block %d, generation %llu; expected tenant %llu, sequence "
				"%llu, layer %u, KV head %u, block %d, generation %llu",
				(unsigned long long)stub->first_page, (unsigned long long)h.tenant,
				(unsigned long long)h.seq, h.layer, h.kv_head, (int)h.block_no,
				(unsigned long long)h.generation, (unsigned long long)stub->header.tenant,
				(unsigned long long)stub->header.seq, stub->header.layer, stub->header.kv_head,
				(int)stub->header.block_no, (unsigned long long)stub->header.generation);
	kvp_spill_block_image(block, dim, &im);
	if (im.bytes[0] + im.bytes[1] != stub->header.payload)
		return kvp_fail(KVP_ECORRUPT, "spill: the block rebuilt for the record at page %llu has %zu bytes, "
				"not the %llu it was written with", (unsigned long long)stub->first_page,
				im.bytes[0] + im.bytes[1], (unsigned long long)stub->header.payload);
	for (int i = 0; i < KVP_IMAGE_PARTS; i++) {
		if (im.bytes[i])
			memcpy(im.part[i], src + at, im.bytes[i]);
		at += im.bytes[i];
	}
	block->n = stub->header.n;
	return KVP_OK;
}

/* ---- batches ----
 * SLICES batches rotate over the slices of the staging buffer: while the device works on the others,
 * the CPU packs (or checks) one. Records adjacent in the file are adjacent in staging too, so they go
 * out as one request: a park into consecutive slots becomes a few large I/Os, not one per block. */

#define BATCH_RECORDS 256
#define BATCH_REQUESTS (RING_ENTRIES / SLICES)

struct request {
	size_t at, len; /* in the batch's slice of staging */
	uint64_t page;  /* in the file */
	int res;
};

struct batch {
	unsigned id;       /* which slice of staging; the tag in user_data */
	size_t used;       /* bytes of the slice taken */
	size_t first;      /* io index of the first record */
	unsigned records, n, pending;
	int submitted;
	size_t rec_len[BATCH_RECORDS];
	struct request req[BATCH_REQUESTS];
};

static unsigned char *batch_base(const struct kvp_spill *d, const struct batch *b)
{
	return d->staging + b->id * (d->staging_cap / SLICES);
}

static int batch_merges(const struct batch *b, uint64_t page)
{
	return b->n && (b->req[b->n - 1].page * KVP_SPILL_PAGE + b->req[b->n - 1].len == page * KVP_SPILL_PAGE);
}

static int batch_fits(const struct kvp_spill *d, const struct batch *b, size_t len, uint64_t page)
{
	return b->records < BATCH_RECORDS && b->used + len <= d->staging_cap / SLICES &&
	       (batch_merges(b, page) || b->n < BATCH_REQUESTS);
}

/* Takes the next len bytes of the slice for the record at file page `page`; returns where they are. */
static unsigned char *batch_add(const struct kvp_spill *d, struct batch *b, size_t index, size_t len,
				uint64_t page)
{
	unsigned char *at = batch_base(d, b) + b->used;
	if (!b->records)
		b->first = index;
	if (batch_merges(b, page))
		b->req[b->n - 1].len += len;
	else
		b->req[b->n++] = (struct request){ .at = b->used, .len = len, .page = page };
	b->rec_len[b->records++] = len;
	b->used += len;
	return at;
}

static int fault_due(uint32_t *countdown)
{
	return *countdown && --*countdown == 0;
}

static kvp_status batch_submit(struct kvp_spill *d, struct batch *b, int write)
{
	unsigned submitted = 0;
	for (unsigned i = 0; i < b->n; i++) {
		/* never NULL: SLICES batches of BATCH_REQUESTS fit the ring */
		struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
		unsigned char *buf = batch_base(d, b) + b->req[i].at;
		size_t len = b->req[i].len;
		off_t off = (off_t)(b->req[i].page * KVP_SPILL_PAGE);
		if (write && fault_due(&d->faults.short_write) && len > KVP_SPILL_PAGE)
			len -= KVP_SPILL_PAGE;
		if (d->registered && write)
			io_uring_prep_write_fixed(sqe, d->fd, buf, (unsigned)len, off, 0);
		else if (d->registered)
			io_uring_prep_read_fixed(sqe, d->fd, buf, (unsigned)len, off, 0);
		else if (write)
			io_uring_prep_write(sqe, d->fd, buf, (unsigned)len, off);
		else
			io_uring_prep_read(sqe, d->fd, buf, (unsigned)len, off);
		io_uring_sqe_set_data64(sqe, (uint64_t)b->id << 32 | i);
	}
	while (submitted < b->n) {
		int r = io_uring_submit(&d->ring);
		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
			b->pending = submitted;
			b->submitted = 1;
			return kvp_fail(KVP_EIO, "spill=%s: io_uring_submit: %s", d->path, strerror(-r));
		}
		submitted += r > 0 ? (unsigned)r : 0;
	}
	b->pending = b->n;
	b->submitted = 1;
	return KVP_OK;
}

/* Waits for every request of bs[id]; completions of the other batch are filed as they come. */
static kvp_status batch_wait(struct kvp_spill *d, struct batch *bs, unsigned id, int write)
{
	struct batch *b = &bs[id];
	kvp_status st = KVP_OK;
	while (b->pending) {
		struct io_uring_cqe *cqe;
		int r = io_uring_wait_cqe(&d->ring, &cqe);
		if (r == -EINTR)
			continue;
		if (r < 0)
			return kvp_fail(KVP_EIO, "spill=%s: io_uring_wait_cqe: %s", d->path, strerror(-r));
		uint64_t tag = io_uring_cqe_get_data64(cqe);
		bs[tag >> 32].req[tag & 0xffffffffu].res = cqe->res;
		bs[tag >> 32].pending--;
		io_uring_cqe_seen(&d->ring, cqe);
	}
	for (unsigned i = 0; i < b->n; i++) {
		int res = fault_due(write ? &d->faults.fail_write : &d->faults.fail_read) ? -EIO : b->req[i].res;
		if (st == KVP_OK && res < 0)
			st = kvp_fail(KVP_EIO, "spill=%s: a %s of %zu bytes failed: %s", d->path, write ? "write" : "read",
				      b->req[i].len, strerror(-res));
		else if (st == KVP_OK && (size_t)res != b->req[i].len)
			st = kvp_fail(KVP_EIO, "spill=%s: short %s: %d of %zu bytes", d->path, write ? "write" : "read",
				      res, b->req[i].len);
		else if (!write)
			(void)VALGRIND_MAKE_MEM_DEFINED(batch_base(d, b) + b->req[i].at, b->req[i].len);
	}
	return st;
}

/* What a transfer needs besides the batches. */
struct transfer {
	struct kvp_spill *d;
	struct kvp_spill_io *io;
	uint32_t dim;
	int write;
	struct batch b[SLICES];
	unsigned cur;
	kvp_status st;
};

/* Waits for batch id when it was submitted, checks and (reading) unpacks it, and empties it. Runs even
 * after a failure: the device must be done with the staging buffer before anyone reuses it. */
static void settle(struct transfer *x, unsigned id)
{
	struct batch *b = &x->b[id];
	size_t at = 0;
	if (b->submitted) {
		kvp_status st = batch_wait(x->d, x->b, id, x->write);
		if (x->st == KVP_OK)
			x->st = st;
	}
	for (unsigned i = 0; !x->write && x->st == KVP_OK && i < b->records; i++) {
		x->st = kvp_spill_record_unpack(x->io[b->first + i].stub, x->io[b->first + i].block, x->dim,
				      batch_base(x->d, b) + at);
		at += b->rec_len[i];
	}
	*b = (struct batch){ .id = id };
}

/* Every batch but the current one, oldest first. */
static void settle_others(struct transfer *x)
{
	for (unsigned k = 1; k < SLICES; k++)
		settle(x, (x->cur + k) % SLICES);
}

/* The whole pages of a block's rows, mapped now. A block read back usually gets memory the arena has
 * given back to the system, and faulting it in page by page while unpacking costs more than the copy;
 * one madvise per block does it in the kernel, while the device reads. Best effort: without
 * MADV_POPULATE_WRITE (Linux < 5.14) the copy faults the pages in as before. */
static void rows_populate(const struct kvp_block *b)
{
	uintptr_t from = ((uintptr_t)b->k + KVP_SPILL_PAGE - 1) & ~(uintptr_t)(KVP_SPILL_PAGE - 1);
	uintptr_t to = ((uintptr_t)b->k + b->data_size) & ~(uintptr_t)(KVP_SPILL_PAGE - 1);
#ifdef MADV_POPULATE_WRITE
	if (to > from)
		madvise((void *)from, to - from, MADV_POPULATE_WRITE);
#else
	(void)from;
	(void)to;
#endif
}

/* Submits the current batch (reads and writes are packed or queued before this), maps the rows its
 * records are read into, settles the oldest batch and makes it current. */
static void rotate(struct transfer *x)
{
	const struct batch *b = &x->b[x->cur];
	if (x->st == KVP_OK && b->n)
		x->st = batch_submit(x->d, &x->b[x->cur], x->write);
	for (unsigned i = 0; !x->write && x->st == KVP_OK && i < b->records; i++)
		rows_populate(x->io[b->first + i].block);
	x->cur = (x->cur + 1) % SLICES;
	settle(x, x->cur);
}

static kvp_status transfer(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim, int write)
{
	struct transfer x = { .d = d, .io = io, .dim = dim, .write = write };
	for (unsigned k = 0; k < SLICES; k++)
		x.b[k].id = k;
	pthread_mutex_lock(&d->ring_lock);
	for (size_t i = 0; i < n && x.st == KVP_OK; i++) {
		size_t len = record_bytes(io[i].stub);
		uint64_t page = io[i].stub->first_page;
		unsigned char *at;
		if (!batch_fits(d, &x.b[x.cur], len, page))
			rotate(&x);
		if (x.st == KVP_OK && len > d->staging_cap / SLICES) { /* a record larger than a slice: grow, idle */
			settle_others(&x);
			if (x.st == KVP_OK)
				x.st = staging_reserve(d, SLICES * len);
		}
		if (x.st != KVP_OK)
			break;
		at = batch_add(d, &x.b[x.cur], i, len, page);
		if (write)
			record_pack(io[i].stub, io[i].block, dim, at);
	}
	rotate(&x);
	settle_others(&x);
	pthread_mutex_unlock(&d->ring_lock);
	return x.st;
}

kvp_status kvp_spill_write(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim)
{
	return transfer(d, io, n, dim, 1);
}

kvp_status kvp_spill_read(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim)
{
	return transfer(d, io, n, dim, 0);
}

/* ---- single-record reads on the second ring ---- */

/* Submits what is queued; SQEs a failed submit leaves behind go out with the next submit_and_wait. */
static void async_flush(struct kvp_spill *d)
{
	int r;
	do
		r = io_uring_submit(&d->aring);
	while (r == -EINTR);
}

void kvp_spill_read_submit(struct kvp_spill *d, struct kvp_spill_pending *p, size_t n)
{
	pthread_mutex_lock(&d->aring_lock);
	for (size_t i = 0; i < n; i++) {
		size_t len = record_bytes(p[i].stub);
		struct io_uring_sqe *sqe = io_uring_get_sqe(&d->aring);
		p[i].done = 0;
		p[i].buf = NULL;
		if (!sqe) { /* the queue is full: send it, which empties it */
			async_flush(d);
			sqe = io_uring_get_sqe(&d->aring);
		}
		if (!sqe || posix_memalign((void **)&p[i].buf, KVP_SPILL_PAGE, len) != 0) {
			p[i].buf = NULL;
			p[i].res = -ENOMEM;
			p[i].done = 1;
			if (sqe) { /* the slot is taken: a no-op nobody waits for fills it */
				io_uring_prep_nop(sqe);
				io_uring_sqe_set_data(sqe, NULL);
			}
			continue;
		}
		io_uring_prep_read(sqe, d->fd, p[i].buf, (unsigned)len, (off_t)(p[i].stub->first_page * KVP_SPILL_PAGE));
		io_uring_sqe_set_data(sqe, &p[i]);
	}
	async_flush(d);
	pthread_mutex_unlock(&d->aring_lock);
	for (size_t i = 0; i < n; i++) /* while the device reads */
		rows_populate(p[i].block);
}

/* Under aring_lock: waits for one completion and files it with its request. */
static void async_reap_one(struct kvp_spill *d)
{
	struct io_uring_cqe *cqe;
	int r = io_uring_submit_and_wait(&d->aring, 1);
	if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
		return;
	while (io_uring_peek_cqe(&d->aring, &cqe) == 0) {
		struct kvp_spill_pending *req = io_uring_cqe_get_data(cqe);
		if (req) {
			req->res = cqe->res;
			req->done = 1;
		}
		io_uring_cqe_seen(&d->aring, cqe);
	}
}

static kvp_status async_check(struct kvp_spill *d, struct kvp_spill_pending *p, uint32_t dim)
{
	size_t len = record_bytes(p->stub);
	int res = p->res, fault;
	pthread_mutex_lock(&d->ring_lock);
	fault = p->buf && fault_due(&d->faults.fail_read);
	pthread_mutex_unlock(&d->ring_lock);
	if (fault)
		res = -EIO;
	if (res == -ENOMEM && !p->buf)
		return kvp_fail(KVP_ENOMEM, "spill: no memory for a %zu-byte read buffer", len);
	if (res < 0)
		return kvp_fail(KVP_EIO, "spill=%s: a read of %zu bytes failed: %s", d->path, len, strerror(-res));
	if ((size_t)res != len)
		return kvp_fail(KVP_EIO, "spill=%s: short read: %d of %zu bytes", d->path, res, len);
	(void)VALGRIND_MAKE_MEM_DEFINED(p->buf, len);
	return kvp_spill_record_unpack(p->stub, p->block, dim, p->buf);
}

kvp_status kvp_spill_read_wait(struct kvp_spill *d, struct kvp_spill_pending *p, size_t n, uint32_t dim)
{
	kvp_status first = KVP_OK;
	char why[512] = "";
	pthread_mutex_lock(&d->aring_lock);
	for (size_t i = 0; i < n; i++)
		while (!p[i].done)
			async_reap_one(d);
	pthread_mutex_unlock(&d->aring_lock);
	for (size_t i = 0; i < n; i++) {
		p[i].st = async_check(d, &p[i], dim);
		if (first == KVP_OK && p[i].st != KVP_OK) {
			first = p[i].st;
			snprintf(why, sizeof why, "%s", kvp_last_error()); /* later failures must not hide it */
		}
		free(p[i].buf);
		p[i].buf = NULL;
	}
	return first == KVP_OK ? KVP_OK : kvp_fail(first, "%s", why);
}
