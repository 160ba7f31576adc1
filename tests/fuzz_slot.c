/*
 * libFuzzer target for the spill-slot reader (kvp_spill_record_unpack): whatever bytes a slot holds,
 * reading it must either return KVP_ECORRUPT or restore exactly the block the stub describes; it must
 * never crash or read or write outside the record and the block. Built and run by `make fuzz`.
 *
 * The first input byte picks a mode: even, the rest of the input is the record as is (so almost every
 * input fails its checksum); odd, the harness first gives the record a correct CRC32C, so the fuzzer
 * reaches the identity check and, when it matches the header, the copy.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels/crc32c.h"
#include "pager/pager.h"

enum { CAP = 16, DIM = 8 };

static struct kvp_spilled stub;
static struct kvp_block block;
static int32_t pos[CAP];
static float kv[2 * CAP * DIM]; /* the block's one K and V allocation */
static unsigned char record[KVP_SPILL_PAGE];

static void setup(void)
{
	block.cap = CAP;
	block.store = KVP_STORE_FP32;
	block.pos = pos;
	block.k = kv;
	block.v = kv + CAP * DIM;
	block.data_size = sizeof kv;
	block.payload = sizeof kv;
	stub.pages = 1;
	stub.dim = DIM;
	stub.header = (struct kvp_slot_header){ .magic = KVP_SLOT_MAGIC, .tenant = 1, .seq = 2, .layer = 3,
						.kv_head = 1, .block_no = 7, .n = 5, .cap = CAP,
						.store = KVP_STORE_FP32, .generation = 99,
						.payload = sizeof pos + sizeof kv };
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kvp_slot_header h;
	kvp_status st;
	if (!stub.pages)
		setup();
	if (size < 1)
		return 0;
	memset(record, 0, sizeof record);
	memcpy(record, data + 1, size - 1 < sizeof record ? size - 1 : sizeof record);
	stub.header.crc = 0x5eed5eedu; /* what the stub remembers writing */
	if (data[0] & 1) {
		uint32_t crc = kvp_crc32c(0, record + 4, sizeof h - 4 + stub.header.payload);
		memcpy(record, &crc, sizeof crc);
		stub.header.crc = crc;
	}
	block.n = 0;
	st = kvp_spill_record_unpack(&stub, &block, DIM, record);
	memcpy(&h, record, sizeof h);
	if (st == KVP_OK && (memcmp(&h, &stub.header, sizeof h) != 0 || block.n != stub.header.n))
		abort(); /* accepted a record that is not the block's */
	if (st != KVP_OK && st != KVP_ECORRUPT)
		abort();
	return 0;
}
