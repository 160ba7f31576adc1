/* The remote tier's record format (tier/remote.h has the layout): pure functions over bytes. */
#include <string.h>

#include "kernels/crc32c.h"
#include "tier/remote.h"

static void put32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get32(const unsigned char *p)
{
	uint32_t v = 0;
	for (int i = 3; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

/* The header as id says it should be, its CRC field zero. */
static void header_fill(const struct kvp_record_id *id, unsigned char h[KVP_RECORD_HEADER])
{
	memset(h, 0, KVP_RECORD_HEADER);
	put32(h, KVP_RECORD_MAGIC);
	put32(h + 4, KVP_RECORD_VERSION);
	put32(h + 12, id->layer);
	put32(h + 16, id->kv_head);
	put32(h + 20, id->tokens);
	put32(h + 24, id->store);
	put64(h + 32, id->chain);
	put64(h + 40, id->codec);
	put64(h + 48, id->payload);
}

static uint32_t record_crc(const unsigned char *header, const void *payload, size_t payload_len)
{
	static const unsigned char zero[4];
	uint32_t crc = kvp_crc32c(0, header, 8);
	crc = kvp_crc32c(crc, zero, sizeof zero);
	crc = kvp_crc32c(crc, header + 12, KVP_RECORD_HEADER - 12);
	return kvp_crc32c(crc, payload, payload_len);
}

size_t kvp_record_bytes(const struct kvp_record_id *id)
{
	if (id->payload > SIZE_MAX - KVP_RECORD_HEADER)
		return 0;
	return (size_t)id->payload + KVP_RECORD_HEADER;
}

kvp_status kvp_record_pack(const struct kvp_record_id *id, const void *payload, void *out, size_t cap,
			   size_t *used)
{
	size_t bytes = kvp_record_bytes(id);
	unsigned char *h = out;
	if (!bytes || cap < bytes)
		return kvp_fail(KVP_EINVAL, "record: %llu payload bytes do not fit in %zu", (unsigned long long)id->payload,
				cap);
	header_fill(id, h);
	if (id->payload)
		memcpy(h + KVP_RECORD_HEADER, payload, (size_t)id->payload);
	put32(h + 8, record_crc(h, h + KVP_RECORD_HEADER, (size_t)id->payload));
	*used = bytes;
	return KVP_OK;
}

/* The name of the first header field (after magic and version) that differs from the expected header. */
static const char *field_differing(const unsigned char *got, const unsigned char *want)
{
	static const struct {
		unsigned off, len;
		const char *name;
	} fields[] = { { 12, 4, "layer" },  { 16, 4, "KV head" }, { 20, 4, "token count" },
		       { 24, 4, "storage" }, { 28, 4, "reserved" }, { 32, 8, "chain hash" },
		       { 40, 8, "codec id" }, { 48, 8, "payload length" }, { 56, 8, "reserved" } };
	for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
		if (memcmp(got + fields[i].off, want + fields[i].off, fields[i].len))
			return fields[i].name;
	return NULL;
}

kvp_status kvp_record_unpack(const struct kvp_record_id *expected, const void *src, size_t len,
			     const void **payload, size_t *used)
{
	unsigned char want[KVP_RECORD_HEADER];
	const unsigned char *h = src;
	size_t bytes = kvp_record_bytes(expected);
	const char *field;
	if (!bytes || len < bytes)
		return kvp_fail(KVP_ECORRUPT, "record: %zu bytes, %zu expected", len, bytes);
	if (get32(h) != KVP_RECORD_MAGIC)
		return kvp_fail(KVP_ECORRUPT, "record: magic %#x is not a record's", get32(h));
	if (get32(h + 4) != KVP_RECORD_VERSION)
		return kvp_fail(KVP_ECORRUPT, "record: format version %u, this library reads %u", get32(h + 4),
				KVP_RECORD_VERSION);
	header_fill(expected, want);
	if ((field = field_differing(h, want)))
		return kvp_fail(KVP_ECORRUPT, "record: its %s is not the expected one (chain %016llx)", field,
				(unsigned long long)expected->chain);
	if (get32(h + 8) != record_crc(h, h + KVP_RECORD_HEADER, (size_t)expected->payload))
		return kvp_fail(KVP_ECORRUPT, "record: CRC32C mismatch (chain %016llx)",
				(unsigned long long)expected->chain);
	*payload = h + KVP_RECORD_HEADER;
	*used = bytes;
	return KVP_OK;
}
