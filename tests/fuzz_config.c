/*
 * libFuzzer target for the config grammar: any bytes as a pool, tenant, codec or policy spec must give
 * KVP_OK or a status with a message, never a crash, a leak or a read past the text. Built and run by
 * `make fuzz`. The first byte picks which spec the rest is.
 */
#include <stdlib.h>
#include <string.h>

#include "kvpager.h"
#include "pager/pager.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const kvp_shape shape = { 2, 4, 2, 64, 1e4f, KVP_ROPE_HALF };
	struct kvp_tenant_config cfg;
	uint64_t quota = 0;
	char *text;
	kvp_codec *c;
	kvp_policy *p;

	if (size < 1 || size > 4096)
		return 0;
	/* the public calls take NUL-terminated text; a NUL inside ends it early, as it would for a host */
	if (!(text = malloc(size)))
		return 0;
	memcpy(text, data + 1, size - 1);
	text[size - 1] = '\0';
	switch (data[0] % 3) {
	case 0:
		(void)kvp_tenant_config_parse(&cfg, &quota, text);
		break;
	case 1:
		if (kvp_codec_open(text, 64, &c) == KVP_OK)
			kvp_codec_close(c);
		break;
	default:
		/* stats= files are the .kvtria target's business */
		if (!strstr(text, "stats=") && kvp_policy_open(text, &shape, &p) == KVP_OK)
			kvp_policy_close(p);
		break;
	}
	free(text);
	return 0;
}
