/*
 * The dlopen entry. A host asks for the major version it was compiled against and gets a table of
 * every public call; minor versions only append members, and `size` tells the host how many it has.
 */
#include "base/base.h"

static const kvp_plugin_v1 table_v1 = {
	.abi_major = KVP_ABI_MAJOR,
	.abi_minor = KVP_ABI_MINOR,
	.size = sizeof(kvp_plugin_v1),
	.strerror = kvp_strerror,
	.last_error = kvp_last_error,
	.pool_open = kvp_pool_open,
	.pool_close = kvp_pool_close,
	.tenant_open = kvp_tenant_open,
	.tenant_close = kvp_tenant_close,
	.seq_open = kvp_seq_open,
	.seq_fork = kvp_seq_fork,
	.seq_close = kvp_seq_close,
	.append = kvp_append,
	.attend = kvp_attend,
	.seq_step = kvp_seq_step,
	.gather = kvp_gather,
	.seq_park = kvp_seq_park,
	.seq_unpark = kvp_seq_unpark,
	.seq_stats = kvp_seq_stats,
	.tenant_stats = kvp_tenant_stats,
	.codec_open = kvp_codec_open,
	.codec_group = kvp_codec_group,
	.codec_bytes = kvp_codec_bytes,
	.codec_encode = kvp_codec_encode,
	.codec_decode = kvp_codec_decode,
	.codec_dot = kvp_codec_dot,
	.codec_close = kvp_codec_close,
	.policy_open = kvp_policy_open,
	.policy_score = kvp_policy_score,
	.policy_close = kvp_policy_close,
	.policy_observe = kvp_policy_observe,
	.seq_head_level = kvp_seq_head_level,
	.seq_set_head_level = kvp_seq_set_head_level,
	.seq_open_prefix = kvp_seq_open_prefix,
	.pool_remote_stats = kvp_pool_remote_stats,
	.pool_flush = kvp_pool_flush,
};

const kvp_plugin_v1 *kvp_plugin(uint32_t abi_major)
{
	if (abi_major == KVP_ABI_MAJOR)
		return &table_v1;
	kvp_fail(KVP_EABI, "kvp_plugin: ABI major %u is not served; this library serves major %d", abi_major,
		 KVP_ABI_MAJOR);
	return NULL;
}
