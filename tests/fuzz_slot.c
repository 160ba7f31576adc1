/*
 * libFuzzer target for the spill-slot reader (kvp_spill_record_unpack): whatever bytes a slot holds,
 * reading it must either return KVP_ECORRUPT or restore exactly the block the stub describes; it must
 * never crash or read or write outside the record and the block. Built and run by `make fuzz`.
 *
 * The first input byte picks a mode: even, the rest of the input is the record as is, and the stub
 * remembers the CRC the library wrote for the block (so a mutated record fails its checksum, the library's
 * own passes); odd, the harness first gives the record a correct CRC32C and the stub remembers that, so
 * the fuzzer reaches the identity check and, when it matches the header, the copy. The seeds in
 * tests/corpus/fuzz_slot (tests/seed_corpus.c) are records the spill device wrote for this target's block,
 * in both modes.
 */
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz_slot_stub.h"

static struct slot_stub slot;
static unsigned char record[KVP_SPILL_PAGE];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kvp_slot_header h;
	kvp_status st;
	struct kvp_spilled *stub = &slot.stub;
	if (!stub->pages)
		slot_stub_init(&slot);
	if (size < 1)
		return 0;
	memset(record, 0, sizeof record);
	memcpy(record, data + 1, size - 1 < sizeof record ? size - 1 : sizeof record);
	stub->header.crc = slot.written_crc; /* what the stub remembers writing */
	if (data[0] & 1) {
		uint32_t crc = kvp_crc32c(0, record + 4, sizeof h - 4 + stub->header.payload);
		memcpy(record, &crc, sizeof crc);
		stub->header.crc = crc;
	}
	slot.block.n = 0;
	st = kvp_spill_record_unpack(stub, &slot.block, SLOT_DIM, record);
	memcpy(&h, record, sizeof h);
	if (st == KVP_OK && (memcmp(&h, &stub->header, sizeof h) != 0 || slot.block.n != stub->header.n))
		abort(); /* accepted a record that is not the block's */
	if (st != KVP_OK && st != KVP_ECORRUPT)
		abort();
	return 0;
}
