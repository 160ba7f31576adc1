/*
 * The block and stub the spill-slot fuzz target reads records for, shared with tests/seed_corpus.c, which
 * writes that block through a real spill device so the target's seeds are records the library made.
 */
#ifndef KVP_TESTS_FUZZ_SLOT_STUB_H
#define KVP_TESTS_FUZZ_SLOT_STUB_H

#include <string.h>

#include "kernels/crc32c.h"
#include "pager/pager.h"

enum { SLOT_CAP = 16, SLOT_DIM = 8 };

struct slot_stub {
	struct kvp_spilled stub;
	struct kvp_block block; /* its positions stay in memory: records hold K and V only */
	float kv[2 * SLOT_CAP * SLOT_DIM]; /* the block's one K and V allocation */
	uint32_t written_crc; /* the CRC of the record the library writes for the block as slot_stub_init fills it */
};

static inline void slot_stub_init(struct slot_stub *s)
{
	memset(s, 0, sizeof *s);
	s->block.cap = SLOT_CAP;
	s->block.store = KVP_STORE_FP32;
	s->block.pos_base = 100;
	s->block.k = s->kv;
	s->block.v = s->kv + SLOT_CAP * SLOT_DIM;
	s->block.data_size = sizeof s->kv;
	s->block.payload = sizeof s->kv;
	s->stub.pages = 1;
	s->stub.dim = SLOT_DIM;
	s->stub.header = (struct kvp_slot_header){ .magic = KVP_SLOT_MAGIC, .tenant = 1, .seq = 2, .layer = 3,
						   .kv_head = 1, .block_no = 7, .n = 5, .cap = SLOT_CAP,
						   .store = KVP_STORE_FP32, .generation = 99,
						   .payload = sizeof s->kv };
	for (int i = 0; i < 2 * SLOT_CAP * SLOT_DIM; i++)
		s->kv[i] = (float)(i % 29) * 0.25f - 3.0f;
	{ /* the record's bytes after its crc: the header, then K and V */
		unsigned char rec[sizeof s->stub.header + sizeof s->kv];
		memcpy(rec, &s->stub.header, sizeof s->stub.header);
		memcpy(rec + sizeof s->stub.header, s->kv, sizeof s->kv);
		s->written_crc = kvp_crc32c(0, rec + 4, sizeof rec - 4);
	}
}

#endif
