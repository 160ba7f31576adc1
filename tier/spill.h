/*
 * The spill device: one preallocated file per pool (spill=PATH,spill_max=SIZE) that parked sequences'
 * blocks are written to through io_uring.
 *
 * File layout: 4 KiB pages. A block's record is a run of whole pages: a 64-byte slot header, the block's
 * image (positions, then the K and V buffers as opaque bytes), zero padding to the page. A regular file
 * has one more page after the slots: the label that says this library made it (spill.c). Records live
 * only as long as the pool, so they are in host byte order and carry no format version.
 *
 * One ring per pool, guarded by ring_lock. Why not one per thread: the threads belong to the host and
 * come and go without telling us, each ring costs a file descriptor, locked memory and registered
 * buffers, and a park already submits a whole sequence in large batches, so the device (not the lock)
 * is the bottleneck. Slot bookkeeping has its own lock so a park that waits for I/O never blocks another
 * sequence's plan or release.
 */
#ifndef KVP_TIER_SPILL_H
#define KVP_TIER_SPILL_H

#include <stdint.h>

#include "base/base.h"

struct kvp_pool_obj;
struct kvp_tenant_obj;
struct kvp_seq_obj;
struct kvp_block;
struct kvp_spill;

#define KVP_SPILL_PAGE 4096u
#define KVP_SLOT_MAGIC 0x5350564bu /* "KVPS" in a little-endian dump */
#define KVP_SLOT_SINK UINT32_MAX   /* block_no of a stream's sink block */
/* 2 MiB: registered buffers count against RLIMIT_MEMLOCK, often 8 MiB for all of a user's processes. */
#define KVP_SPILL_BUFFER_DEFAULT (2u << 20)

/* The first 64 bytes of every record. Everything after crc is the block's identity and shape: a read
 * must find exactly the header that was written, so a slot can never be taken for another block. */
struct kvp_slot_header {
	uint32_t crc;   /* CRC32C of bytes [4, 64) of this header, then of the payload */
	uint32_t magic; /* KVP_SLOT_MAGIC */
	uint64_t tenant, seq; /* spill ids of the tenant and of the sequence that wrote the record */
	uint32_t layer, kv_head;
	uint32_t block_no;    /* index in the stream's block table, or KVP_SLOT_SINK */
	uint32_t n, cap, store;
	uint64_t generation; /* pool-wide, new for every record: a reused slot never matches an old one */
	uint64_t payload;    /* bytes after the header */
};
_Static_assert(sizeof(struct kvp_slot_header) == 64, "the slot header is 64 bytes");

/* A block's record on the device. Shared by every parked sequence whose table held that block. Guarded
 * by the device lock. */
struct kvp_spilled {
	struct kvp_tenant_obj *tenant;
	uint32_t refs;           /* parked table entries that point here */
	uint64_t first_page, pages;
	struct kvp_slot_header header; /* as written, crc included */
	/* An in-memory twin of the record, held with a block reference, or NULL. While it is held the block
	 * is shared, so nobody writes it in place: a later park of a sequence holding it writes nothing, and
	 * a later unpark shares it instead of reading. */
	struct kvp_block *twin;
	uint32_t dim; /* of the sequence's streams: block accounting needs it */
	size_t k_bytes, v_bytes; /* what a codec-encoded block is rebuilt with (kvp_block_new_cold) */
	uint32_t level;          /* and the ladder level whose codecs read it */
	/* The block's positions stay in memory (a reference): they are what a rebuilt block gets back. */
	int32_t pos_base;
	struct kvp_positions *positions;
};

/* Twins by block: open addressing, linear probing, backward-shift deletion. Under the device lock. */
struct kvp_twin_map {
	struct kvp_block **keys;
	struct kvp_spilled **vals;
	size_t cap, n; /* cap is 0 or a power of two */
};

/* One record to move: its stub and the block it is written from or read into. */
struct kvp_spill_io {
	struct kvp_spilled *stub;
	struct kvp_block *block;
};

/* Test hooks, compiled in: they make the next I/Os fail the way a device can. Counts are 1-based: 1
 * means the next write (or read) from now. The pager's kvp_spill_inject takes the pool's handle, as the
 * host holds it. */
struct kvp_spill_faults {
	uint32_t fail_write;  /* that write completes with EIO (after really being written) */
	uint32_t short_write; /* that write is submitted one page short: a real short write */
	uint32_t fail_read;   /* that read completes with EIO */
};
void kvp_spill_device_inject(struct kvp_spill *d, const struct kvp_spill_faults *f);
/* Nonzero makes the next kvp_spill_open behave as if the file system refused O_DIRECT. */
extern int kvp_spill_refuse_direct;

/* ---- device (spill.c) ---- */
/* buffer_bytes: the registered staging buffer (spill_buffer=), cut in slices that rotate (spill.c). */
kvp_status kvp_spill_open(struct kvp_pool_obj *pool, const char *path, unsigned path_len, uint64_t max_bytes,
			  uint64_t buffer_bytes);
void kvp_spill_close(struct kvp_pool_obj *pool);
/* For tests and benchmarks: what the device does (0 without one; the pager's kvp_spill_is_direct and
 * the like ask it for the pool behind a handle). */
int kvp_spill_device_direct(const struct kvp_spill *d);
int kvp_spill_device_registered(const struct kvp_spill *d);
uint64_t kvp_spill_device_pages_used(struct kvp_spill *d);
uint64_t kvp_spill_device_pages_total(const struct kvp_spill *d);
void kvp_spill_lock(struct kvp_spill *d);
void kvp_spill_unlock(struct kvp_spill *d);
/* Under the device lock. */
uint64_t kvp_spill_next_id(struct kvp_spill *d);
struct kvp_twin_map *kvp_spill_twins(struct kvp_spill *d);
kvp_status kvp_spill_slot_alloc(struct kvp_spill *d, uint64_t pages, uint64_t *first);
void kvp_spill_slot_free(struct kvp_spill *d, uint64_t first, uint64_t pages);
/* Pages a record of payload bytes takes. */
uint64_t kvp_spill_record_pages(uint64_t payload);
/* The block's image as the device sees it: the one place its byte size is computed. */
#define KVP_IMAGE_PARTS 2
struct kvp_block_image {
	void *part[KVP_IMAGE_PARTS]; /* nothing (positions stay in memory, with the stub), then K and V's allocation */
	size_t bytes[KVP_IMAGE_PARTS];
};
void kvp_spill_block_image(const struct kvp_block *b, uint32_t dim, struct kvp_block_image *im);
/* Without the device lock (they take the ring lock). Write: records from io[i].block to their slots;
 * sets each stub's header.crc. Read: records into io[i].block (already allocated with the stub's shape),
 * checked against the stub's header; the block's n is set. All or nothing is the caller's business:
 * on failure some records may have been transferred. */
/* The slot reader: checks the record at src (the stub's pages, as read) against the stub: CRC32C first,
 * then every header byte; only then copies the image into the block and sets its n. Sizes come from the
 * stub, never from the bytes read. KVP_ECORRUPT on any mismatch. */
kvp_status kvp_spill_record_unpack(const struct kvp_spilled *stub, struct kvp_block *block, uint32_t dim,
				   const unsigned char *src);
kvp_status kvp_spill_write(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim);
kvp_status kvp_spill_read(struct kvp_spill *d, struct kvp_spill_io *io, size_t n, uint32_t dim);

/* Asynchronous record reads, for restores of single blocks with prefetch (restore.c). They go through
 * the device's second ring, so they can stay in flight between calls while parks and unparks use the
 * first: whoever waits files every completion of that ring by the request's address, so requests must
 * stay alive until waited for. Each has its own page-aligned buffer. */
struct kvp_spill_pending {
	struct kvp_spilled *stub;
	struct kvp_block *block; /* rows already allocated with the stub's shape */
	unsigned char *buf;
	int res, done; /* under the ring's lock */
	kvp_status st; /* after the wait: KVP_OK when the block holds the record */
};
/* Submits what it can; a request that could not be submitted is done with res -ENOMEM. */
void kvp_spill_read_submit(struct kvp_spill *d, struct kvp_spill_pending *p, size_t n);
/* Waits for every request, checks and unpacks each; the first failure is returned and each request's
 * own outcome is in its st. Buffers are freed. */
kvp_status kvp_spill_read_wait(struct kvp_spill *d, struct kvp_spill_pending *p, size_t n, uint32_t dim);

/* Records of single blocks (block.c), under the device lock. */
struct kvp_seq_obj;
struct kvp_call;
kvp_status kvp_spill_stub_new(struct kvp_spill *d, struct kvp_seq_obj *s, uint32_t layer, uint32_t kv_head,
			      uint32_t block_no, const struct kvp_block *b, struct kvp_spilled **out,
			      struct kvp_call *call);
/* call: the spill whose prepaid charges the stub's free settles, or NULL */
void kvp_spill_stub_drop(struct kvp_spill *d, struct kvp_spilled *stub, struct kvp_call *call);
/* Twins (block.c), under the device lock: the record's in-memory twin of b, or NULL; make b the stub's
 * twin (a block reference); free the twins no sequence holds any more. */
struct kvp_spilled *kvp_twin_find(struct kvp_twin_map *m, const struct kvp_block *b);
void kvp_twin_set(struct kvp_twin_map *m, struct kvp_spilled *stub, struct kvp_block *b);
void kvp_twins_trim(struct kvp_twin_map *m, struct kvp_call *call);

/* ---- parking (park.c) ---- */
struct kvp_parked;
/* KVP_EINVAL naming the call: a parked sequence serves only unpark, stats, step and close. */
kvp_status kvp_seq_parked_error(const struct kvp_seq_obj *s, const char *call);
void kvp_seq_parked_release(struct kvp_seq_obj *s); /* on destroy: drop the records */
uint64_t kvp_seq_parked_bytes(const struct kvp_seq_obj *s); /* its records on the device */
uint64_t kvp_seq_parked_meta(const struct kvp_seq_obj *s);  /* its record table and stubs in memory */

#endif /* KVP_TIER_SPILL_H */
