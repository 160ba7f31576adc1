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
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/crc32c.h"
#include "pager.h"

#define RING_ENTRIES 64
#define STAGING_DEFAULT (2u << 20) /* grows to the largest record; 2 MiB keeps us under small memlock limits */
#define MIN_PAGES 16

int kvp_spill_refuse_direct;

struct kvp_spill {
	int fd, direct, created;
	char path[4096];
	uint64_t pages;
	pthread_mutex_t lock; /* bitmap, counters, stubs and twins (park.c) */
	uint64_t *bitmap, used, hint;
	uint64_t next_id; /* tenant and sequence ids, and record generations */
	struct kvp_twin_map twins;
	pthread_mutex_t ring_lock; /* ring, staging, faults */
	struct io_uring ring;
	unsigned char *staging;
	size_t staging_cap;
	int registered;
	struct kvp_spill_faults faults;
};

/* ---- the file ---- */

static int open_file(struct kvp_spill *d)
{
	int flags = O_RDWR | O_CLOEXEC, fd;
	if (kvp_spill_refuse_direct) {
		kvp_spill_refuse_direct = 0;
		errno = EINVAL;
		fd = -1;
	} else {
		fd = open(d->path, flags | O_CREAT | O_EXCL | O_DIRECT, 0600);
		d->created = fd >= 0;
		if (fd < 0 && errno == EEXIST)
			fd = open(d->path, flags | O_DIRECT);
	}
	d->direct = fd >= 0;
	if (fd < 0 && errno == EINVAL) {
		fd = open(d->path, flags | O_CREAT | O_EXCL, 0600);
		d->created = fd >= 0;
		if (fd < 0 && errno == EEXIST)
			fd = open(d->path, flags);
	}
	return fd;
}

/* Regular files are preallocated so a park never waits for block allocation or finds the disk full; a
 * block device is used as it is, up to spill_max. */
static kvp_status size_file(struct kvp_spill *d, uint64_t max_bytes)
{
	struct stat st;
	uint64_t bytes = max_bytes / KVP_SPILL_PAGE * KVP_SPILL_PAGE;
	if (fstat(d->fd, &st) != 0)
		return kvp_fail(KVP_EIO, "spill=%s: fstat: %s", d->path, strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		uint64_t dev = 0;
		if (ioctl(d->fd, BLKGETSIZE64, &dev) != 0)
			return kvp_fail(KVP_EIO, "spill=%s: device size: %s", d->path, strerror(errno));
		bytes = dev < bytes ? dev / KVP_SPILL_PAGE * KVP_SPILL_PAGE : bytes;
	} else if (!S_ISREG(st.st_mode)) {
		return kvp_fail(KVP_EINVAL, "spill=%s: not a regular file or a block device", d->path);
	} else if (ftruncate(d->fd, 0) != 0 || fallocate(d->fd, 0, 0, (off_t)bytes) != 0) {
		int e = errno;
		if (e == EOPNOTSUPP && ftruncate(d->fd, (off_t)bytes) == 0)
			kvp_fail(KVP_OK, "spill=%s: the file system cannot preallocate; the file is sparse", d->path);
		else
			return kvp_fail(e == ENOSPC ? KVP_ENOMEM : KVP_EIO, "spill=%s: reserving %llu bytes: %s",
					d->path, (unsigned long long)bytes, strerror(e));
	}
	d->pages = bytes / KVP_SPILL_PAGE;
	if (d->pages < MIN_PAGES)
		return kvp_fail(KVP_EINVAL, "spill_max=%llu: at least %u bytes are needed",
				(unsigned long long)max_bytes, MIN_PAGES * KVP_SPILL_PAGE);
	return KVP_OK;
}

/* ---- the ring and its staging buffer ---- */

static kvp_status staging_reserve(struct kvp_spill *d, size_t bytes)
{
	struct iovec iov;
	void *p;
	if (bytes <= d->staging_cap)
		return KVP_OK;
	if (bytes < STAGING_DEFAULT)
		bytes = STAGING_DEFAULT;
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
	if (r < 0)
		return kvp_fail(KVP_EUNSUPPORTED, "spill=%s: io_uring is not available here (io_uring_queue_init: %s)",
				d->path, strerror(-r));
	if (staging_reserve(d, STAGING_DEFAULT) != KVP_OK) {
		io_uring_queue_exit(&d->ring);
		return KVP_ENOMEM;
	}
	return KVP_OK;
}

static void device_free(struct kvp_spill *d)
{
	if (d->fd >= 0) {
		close(d->fd);
		if (d->created)
			unlink(d->path);
	}
	free(d->bitmap);
	free(d->staging);
	free(d->twins.keys);
	free(d->twins.vals);
	free(d);
}

kvp_status kvp_spill_open(struct kvp_pool *pool, const char *path, unsigned path_len, uint64_t max_bytes)
{
	struct kvp_spill *d = calloc(1, sizeof *d);
	kvp_status st;
	if (!d)
		return kvp_fail(KVP_ENOMEM, "spill: out of memory");
	if (!path_len || path_len >= sizeof d->path) {
		free(d);
		return kvp_fail(KVP_EINVAL, "spill=: a path of 1..%zu characters is required", sizeof d->path - 1);
	}
	memcpy(d->path, path, path_len);
	if ((d->fd = open_file(d)) < 0) {
		st = kvp_fail(KVP_EIO, "spill=%s: %s", d->path, strerror(errno));
		d->fd = -1;
		device_free(d);
		return st;
	}
	if (!d->direct)
		kvp_fail(KVP_OK, "spill=%s: the file system refused O_DIRECT; using buffered I/O", d->path);
	if ((st = size_file(d, max_bytes)) != KVP_OK) {
		device_free(d);
		return st;
	}
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
	d->next_id = 1;
	pool->spill = d;
	return KVP_OK;
}

void kvp_spill_close(struct kvp_pool *pool)
{
	struct kvp_spill *d = pool->spill;
	if (!d)
		return;
	if (d->registered)
		io_uring_unregister_buffers(&d->ring);
	io_uring_queue_exit(&d->ring);
	pthread_mutex_destroy(&d->lock);
	pthread_mutex_destroy(&d->ring_lock);
	pool->spill = NULL;
	device_free(d);
}

int kvp_spill_is_direct(const struct kvp_pool *pool)
{
	return pool->spill && pool->spill->direct;
}

int kvp_spill_is_registered(const struct kvp_pool *pool)
{
	return pool->spill && pool->spill->registered;
}

uint64_t kvp_spill_pages_used(const struct kvp_pool *pool)
{
	uint64_t n;
	if (!pool->spill)
		return 0;
	pthread_mutex_lock(&pool->spill->lock);
	n = pool->spill->used;
	pthread_mutex_unlock(&pool->spill->lock);
	return n;
}

uint64_t kvp_spill_pages_total(const struct kvp_pool *pool)
{
	return pool->spill ? pool->spill->pages : 0;
}

void kvp_spill_inject(struct kvp_pool *pool, const struct kvp_spill_faults *f)
{
	pthread_mutex_lock(&pool->spill->ring_lock);
	pool->spill->faults = *f;
	pthread_mutex_unlock(&pool->spill->ring_lock);
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
	/* Opaque bytes: whatever representation a block has, its K and V buffers are what spills. */
	size_t kv = kvp_block_token_bytes(b, dim) / 2;
	im->part[0] = b->pos;
	im->bytes[0] = (size_t)b->cap * sizeof *b->pos;
	im->part[1] = b->k;
	im->bytes[1] = kv;
	im->part[2] = b->v;
	im->bytes[2] = kv;
}

/* ---- batches: records packed into staging, submitted together, reaped together ---- */

struct batch {
	size_t used;        /* staging bytes taken */
	unsigned n;         /* SQEs queued */
	size_t first;       /* io index of the batch's first record */
	size_t len[RING_ENTRIES];
	int res[RING_ENTRIES];
};

static int fault_due(uint32_t *countdown)
{
	return *countdown && --*countdown == 0;
}

static void batch_queue(struct kvp_spill *d, struct batch *b, int write, const struct kvp_spilled *stub,
			size_t len)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring); /* never NULL: at most RING_ENTRIES queued */
	unsigned char *buf = d->staging + b->used;
	off_t off = (off_t)(stub->first_page * KVP_SPILL_PAGE);
	size_t submit = len;
	if (write && fault_due(&d->faults.short_write) && len > KVP_SPILL_PAGE)
		submit = len - KVP_SPILL_PAGE;
	if (d->registered && write)
		io_uring_prep_write_fixed(sqe, d->fd, buf, (unsigned)submit, off, 0);
	else if (d->registered)
		io_uring_prep_read_fixed(sqe, d->fd, buf, (unsigned)submit, off, 0);
	else if (write)
		io_uring_prep_write(sqe, d->fd, buf, (unsigned)submit, off);
	else
		io_uring_prep_read(sqe, d->fd, buf, (unsigned)submit, off);
	io_uring_sqe_set_data64(sqe, b->n);
	b->len[b->n++] = len;
	b->used += len;
}

/* Submits every queued SQE and waits for all of them; res[i] is each one's result, with injected
 * faults applied. Returns KVP_OK when every request moved all of its bytes. */
static kvp_status batch_run(struct kvp_spill *d, struct batch *b, int write)
{
	unsigned submitted = 0, reaped = 0;
	kvp_status st = KVP_OK;
	while (submitted < b->n) {
		int r = io_uring_submit(&d->ring);
		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
			return kvp_fail(KVP_EIO, "spill=%s: io_uring_submit: %s", d->path, strerror(-r));
		submitted += r > 0 ? (unsigned)r : 0;
	}
	while (reaped < b->n) {
		struct io_uring_cqe *cqe;
		int r = io_uring_wait_cqe(&d->ring, &cqe);
		if (r == -EINTR)
			continue;
		if (r < 0)
			return kvp_fail(KVP_EIO, "spill=%s: io_uring_wait_cqe: %s", d->path, strerror(-r));
		b->res[io_uring_cqe_get_data64(cqe)] = cqe->res;
		io_uring_cqe_seen(&d->ring, cqe);
		reaped++;
	}
	for (unsigned i = 0; i < b->n; i++) {
		if (fault_due(write ? &d->faults.fail_write : &d->faults.fail_read))
			b->res[i] = -EIO;
		if (st == KVP_OK && b->res[i] < 0)
			st = kvp_fail(KVP_EIO, "spill=%s: a %s of %zu bytes failed: %s", d->path, write ? "write" : "read",
				      b->len[i], strerror(-b->res[i]));
		else if (st == KVP_OK && (size_t)b->res[i] != b->len[i])
			st = kvp_fail(KVP_EIO, "spill=%s: short %s: %d of %zu bytes", d->path, write ? "write" : "read",
				      b->res[i], b->len[i]);
	}
	return st;
}

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
	for (int i = 0; i < 3; i++) {
		memcpy(dst + at, im.part[i], im.bytes[i]);
		at += im.bytes[i];
	}
	memset(dst + at, 0, record_bytes(stub) - at);
	stub->header.crc = 0;
	memcpy(dst, &stub->header, sizeof stub->header);
	stub->header.crc = kvp_crc32c(0, dst + 4, at - 4);
	memcpy(dst, &stub->header, sizeof stub->header.crc);
}

kvp_status kvp_spill_write(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim)
{
	struct batch b = { 0 };
	kvp_status st = KVP_OK;
	pthread_mutex_lock(&d->ring_lock);
	for (size_t i = 0; i < n && st == KVP_OK; i++) {
		size_t len = record_bytes(io[i].stub);
		if (b.n == RING_ENTRIES || b.used + len > d->staging_cap) {
			st = batch_run(d, &b, 1);
			b = (struct batch){ .first = i };
		}
		if (st == KVP_OK && (st = staging_reserve(d, len)) == KVP_OK) {
			record_pack(io[i].stub, io[i].block, dim, d->staging + b.used);
			batch_queue(d, &b, 1, io[i].stub, len);
		}
	}
	if (st == KVP_OK)
		st = batch_run(d, &b, 1);
	pthread_mutex_unlock(&d->ring_lock);
	return st;
}

/* Checks one record read into src against its stub, then copies the image into the block. */
static kvp_status record_unpack(const struct kvp_spilled *stub, struct kvp_block *block, uint32_t dim,
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
	for (int i = 0; i < 3; i++) {
		memcpy(im.part[i], src + at, im.bytes[i]);
		at += im.bytes[i];
	}
	block->n = stub->header.n;
	return KVP_OK;
}

static kvp_status batch_unpack(struct kvp_spill *d, const struct batch *b, struct kvp_spill_io *io,
			       uint32_t dim)
{
	size_t at = 0;
	for (unsigned i = 0; i < b->n; i++) {
		kvp_status st = record_unpack(io[b->first + i].stub, io[b->first + i].block, dim, d->staging + at);
		if (st != KVP_OK)
			return st;
		at += b->len[i];
	}
	return KVP_OK;
}

kvp_status kvp_spill_read(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim)
{
	struct batch b = { 0 };
	kvp_status st = KVP_OK;
	pthread_mutex_lock(&d->ring_lock);
	for (size_t i = 0; i < n && st == KVP_OK; i++) {
		size_t len = record_bytes(io[i].stub);
		if (b.n == RING_ENTRIES || b.used + len > d->staging_cap) {
			st = batch_run(d, &b, 0);
			if (st == KVP_OK)
				st = batch_unpack(d, &b, io, dim);
			b = (struct batch){ .first = i };
		}
		if (st == KVP_OK && (st = staging_reserve(d, len)) == KVP_OK)
			batch_queue(d, &b, 0, io[i].stub, len);
	}
	if (st == KVP_OK && (st = batch_run(d, &b, 0)) == KVP_OK)
		st = batch_unpack(d, &b, io, dim);
	pthread_mutex_unlock(&d->ring_lock);
	return st;
}
