/* Pools and tenants: limits, quotas, arenas, and the tenant configuration. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pager.h"

/* spill= and spill_max= as parsed; the device opens once the rest of the pool exists. */
struct spill_spec {
	const char *path;
	unsigned path_len;
	uint64_t max, buffer;
};

static kvp_status spill_spec_parse(struct kvp_args *args, struct spill_spec *sp)
{
	kvp_status st = kvp_args_text(args, "spill", &sp->path, &sp->path_len);
	if (st == KVP_OK)
		st = kvp_args_size(args, "spill_max", &sp->max);
	if (st == KVP_OK)
		st = kvp_args_size(args, "spill_buffer", &sp->buffer);
	if (st != KVP_OK)
		return st;
	if (sp->path && sp->max == UINT64_MAX)
		return kvp_fail(KVP_EINVAL, "pool: spill=%.*s needs spill_max=SIZE, the bytes to reserve for it",
				(int)sp->path_len, sp->path);
	if (!sp->path && (sp->max != UINT64_MAX || sp->buffer != KVP_SPILL_BUFFER_DEFAULT))
		return kvp_fail(KVP_EINVAL, "pool: spill_max= or spill_buffer= without spill=PATH");
	return KVP_OK;
}

static kvp_status pool_config_parse(struct kvp_pool_obj *p, const char *spec, struct spill_spec *sp,
				    struct kvp_remote_config *remote)
{
	struct kvp_args args;
	uint64_t node = UINT64_MAX;
	kvp_status st = kvp_args_parse(&args, "pool", spec, spec ? strlen(spec) : 0);
	if (st == KVP_OK)
		st = kvp_args_size(&args, "mem", &p->limit);
	if (st == KVP_OK)
		st = kvp_args_u64(&args, "numa", 0, 1023, &node);
	if (st == KVP_OK)
		st = spill_spec_parse(&args, sp);
	if (st == KVP_OK)
		st = kvp_remote_config_parse(&args, remote);
	if (st == KVP_OK)
		st = kvp_args_u32(&args, "share_prefix", 0, 1, &p->share_prefix);
	if (st == KVP_OK)
		st = kvp_args_finish(&args);
	p->numa_node = node == UINT64_MAX ? -1 : (int)node;
	return st;
}

static void pool_destroy(struct kvp_pool_obj *p);

kvp_status kvp_pool_open(const char *spec, kvp_pool **out)
{
	struct kvp_pool_obj *p;
	struct spill_spec sp = { .max = UINT64_MAX, .buffer = KVP_SPILL_BUFFER_DEFAULT };
	struct kvp_remote_config remote;
	kvp_status st;
	if (!out)
		return kvp_fail(KVP_EINVAL, "kvp_pool_open: out is NULL");
	*out = NULL;
	if (!(p = calloc(1, sizeof *p)))
		return kvp_fail(KVP_ENOMEM, "kvp_pool_open: out of memory");
	p->limit = UINT64_MAX;
	if ((st = pool_config_parse(p, spec, &sp, &remote)) != KVP_OK) {
		free(p);
		return st;
	}
	pthread_mutex_init(&p->lock, NULL);
	p->magic = KVP_POOL_MAGIC;
	if ((st = kvp_prefix_table_open(p)) != KVP_OK) {
		pool_destroy(p);
		return st;
	}
	kvp_clear_error();
	if (p->numa_node >= 0) {
		st = kvp_numa_check(p->numa_node);
		if (st == KVP_EINVAL) {
			pool_destroy(p);
			return st;
		}
		if (st == KVP_EUNSUPPORTED) {
			/* Placement is an optimisation: run without it, and say so. */
			kvp_fail(KVP_OK, "pool: numa=%d ignored: this machine has no NUMA support", p->numa_node);
			p->numa_node = -1;
		}
	}
	if (sp.path && (st = kvp_spill_open(p, sp.path, sp.path_len, sp.max, sp.buffer)) != KVP_OK) {
		pool_destroy(p);
		return st;
	}
	/* last: a server that does not answer leaves its note in kvp_last_error for the host */
	if (remote.url[0] && (st = kvp_remote_open(&remote, &p->remote)) != KVP_OK) {
		pool_destroy(p);
		return st;
	}
	kvp_handle_fork_guard();
	p->handle = (kvp_pool *)kvp_handle_new(KVP_HANDLE_POOL, p, &p->handle_index);
	if (!p->handle_index) {
		pool_destroy(p);
		return kvp_fail_context(KVP_ENOMEM, "kvp_pool_open");
	}
	*out = p->handle;
	return KVP_OK;
}

static void tenant_unlink_destroy(struct kvp_tenant_obj *t);

/* Its handle is dead from the first line: its tenants' and sequences' handles die with them. */
static void pool_destroy(struct kvp_pool_obj *p)
{
	kvp_handle_free(p->handle_index);
	p->handle_index = 0;
	while (p->tenants)
		tenant_unlink_destroy(p->tenants);
	kvp_prefix_table_close(p); /* empty: each tenant dropped its entries */
	kvp_spill_close(p);
	kvp_remote_close(p->remote);
	p->magic = 0;
	pthread_mutex_destroy(&p->lock);
	free(p);
}

void kvp_pool_close(kvp_pool *h)
{
	void *p;
	/* take: of two closes of one handle, only one gets the pool */
	if (kvp_handle_take(KVP_HANDLE_POOL, h, "kvp_pool_close", &p) != KVP_OK)
		return;
	((struct kvp_pool_obj *)p)->handle_index = 0;
	pool_destroy(p);
}

kvp_status kvp_pool_remote_stats(const kvp_pool *h, kvp_remote_stats *out)
{
	kvp_remote_stats full = { .size = sizeof full };
	struct kvp_remote_counters c;
	void *p;
	kvp_status st = kvp_handle_get(KVP_HANDLE_POOL, h, "kvp_pool_remote_stats", &p);

	if (st != KVP_OK)
		return st;
	if (!out || out->size < sizeof out->size + sizeof out->queued)
		return kvp_fail(KVP_EABI, "kvp_pool_remote_stats: stats->size must be set to sizeof(kvp_remote_stats)");
	kvp_remote_counters(((struct kvp_pool_obj *)p)->remote, &c);
	full.queued = c.queued;
	full.published = c.published;
	full.dropped = c.dropped;
	full.bytes_published = c.bytes_published;
	full.faults = c.faults;
	kvp_sized_copy(out, &full, sizeof full);
	return KVP_OK;
}

kvp_status kvp_pool_flush(kvp_pool *h, uint32_t wait_ms)
{
	struct kvp_remote_counters c;
	void *p;
	kvp_status st = kvp_handle_get(KVP_HANDLE_POOL, h, "kvp_pool_flush", &p);

	if (st != KVP_OK)
		return st;
	if (!kvp_remote_drain(((struct kvp_pool_obj *)p)->remote, wait_ms))
		return KVP_OK;
	kvp_remote_counters(((struct kvp_pool_obj *)p)->remote, &c);
	return kvp_fail(KVP_EBUSY, "kvp_pool_flush: %llu values still queued for the remote tier after %u ms",
			(unsigned long long)c.queued, wait_ms);
}

/* The text of a codec spec, kept for the sequences (their head_dim is known only at kvp_seq_open). */
static kvp_status codec_spec(struct kvp_args *args, const char *key, char out[KVP_CODEC_SPEC_MAX])
{
	const char *v = NULL;
	unsigned n = 0;
	kvp_status st = kvp_args_text(args, key, &v, &n);

	if (st != KVP_OK || !v)
		return st;
	if (n == 0 || n >= KVP_CODEC_SPEC_MAX)
		return kvp_fail(KVP_EINVAL, "tenant: %s=%.*s must be a spec of 1..%d characters", key,
				(int)(n > 64 ? 64 : n), v, KVP_CODEC_SPEC_MAX - 1);
	memcpy(out, v, n);
	out[n] = '\0';
	return KVP_OK;
}

/* model=NAME: an identity the host chooses, kept whole in the prefix cache's hash. */
static kvp_status model_name(struct kvp_args *args, char out[64])
{
	const char *v = NULL;
	unsigned n = 0;
	kvp_status st = kvp_args_text(args, "model", &v, &n);
	if (st != KVP_OK || !v)
		return st;
	for (unsigned i = 0; i < n && n < 64; i++)
		if (v[i] <= ' ' || v[i] > '~' || strchr(",()=", v[i]))
			return kvp_fail(KVP_EINVAL, "tenant: model=%.*s: character %u is not allowed (printable, no "
					"space, ',', '(', ')' or '=')", (int)n, v, i);
	if (n == 0 || n >= 64)
		return kvp_fail(KVP_EINVAL, "tenant: model=%.*s must be a name of 1..63 characters",
				(int)(n > 64 ? 64 : n), v);
	memcpy(out, v, n);
	out[n] = '\0';
	return KVP_OK;
}

/* prefix=on|off, on by default when model= names the weights; on needs a model. */
static kvp_status prefix_config(struct kvp_args *args, struct kvp_tenant_config *cfg)
{
	static const char *const onoff[] = { "off", "on", NULL };
	unsigned prefix = 2; /* not given */
	kvp_status st = model_name(args, cfg->model);
	if (st == KVP_OK)
		st = kvp_args_choice(args, "prefix", onoff, &prefix);
	if (st != KVP_OK)
		return st;
	if (prefix == 1 && !cfg->model[0])
		return kvp_fail(KVP_EINVAL, "tenant: prefix=on needs model=NAME (cached blocks are only valid for "
				"the weights that made them)");
	cfg->prefix = prefix == 2 ? cfg->model[0] != '\0' : prefix;
	return KVP_OK;
}

kvp_status kvp_tenant_config_parse(struct kvp_tenant_config *cfg, uint64_t *quota, const char *spec)
{
	static const char *const stores[] = { "fp32", "fp16", NULL };
	struct kvp_args args;
	unsigned store = KVP_STORE_FP32;
	kvp_status st;

	*cfg = (struct kvp_tenant_config){ .block = 64, .sinks = 4, .window = 128, .store = KVP_STORE_FP32 };
	st = kvp_args_parse(&args, "tenant", spec, spec ? strlen(spec) : 0);
	if (st == KVP_OK)
		st = kvp_args_size(&args, "quota", quota);
	if (st == KVP_OK)
		st = kvp_args_u32(&args, "block", 1, KVP_BLOCK_MAX, &cfg->block);
	if (st == KVP_OK)
		st = kvp_args_u32(&args, "sinks", 0, KVP_BLOCK_MAX, &cfg->sinks);
	if (st == KVP_OK)
		st = kvp_args_u32(&args, "window", 0, 1u << 24, &cfg->window);
	if (st == KVP_OK)
		st = kvp_args_choice(&args, "store", stores, &store);
	if (st == KVP_OK)
		st = codec_spec(&args, "k", cfg->k_spec);
	if (st == KVP_OK)
		st = codec_spec(&args, "v", cfg->v_spec);
	if (st == KVP_OK)
		st = codec_spec(&args, "policy", cfg->policy_spec);
	if (st == KVP_OK)
		st = kvp_args_u32(&args, "pin_prompt", 0, 1, &cfg->pin_prompt);
	if (st == KVP_OK)
		st = kvp_gating_config(&args, &cfg->gating);
	if (st == KVP_OK)
		st = prefix_config(&args, cfg);
	if (st == KVP_OK)
		st = kvp_args_finish(&args);
	cfg->store = (enum kvp_store)store;
	if (st == KVP_OK)
		st = kvp_cold_check(cfg);
	if (st == KVP_OK)
		st = kvp_gating_check(&cfg->gating, cfg->policy_spec, cfg->k_spec, cfg->v_spec);
	if (st == KVP_OK)
		st = kvp_evict_check(cfg);
	return st;
}

static kvp_status tenant_name_check(struct kvp_pool_obj *pool, const char *name)
{
	if (!name || !*name || strlen(name) >= sizeof(((struct kvp_tenant_obj *)0)->name))
		return kvp_fail(KVP_EINVAL, "kvp_tenant_open: a name of 1..63 characters is required");
	for (struct kvp_tenant_obj *t = pool->tenants; t; t = t->next)
		if (!strcmp(t->name, name))
			return kvp_fail(KVP_EINVAL, "kvp_tenant_open: tenant '%s' already exists", name);
	return KVP_OK;
}

kvp_status kvp_tenant_open(kvp_pool *h, const char *name, const char *spec, kvp_tenant **out)
{
	struct kvp_pool_obj *pool;
	struct kvp_tenant_obj *t;
	void *found;
	kvp_status st;
	if (out)
		*out = NULL;
	if ((st = kvp_handle_get(KVP_HANDLE_POOL, h, "kvp_tenant_open", &found)) != KVP_OK)
		return st;
	if (!out)
		return kvp_fail(KVP_EINVAL, "kvp_tenant_open: out is NULL");
	pool = found;
	if (!(t = calloc(1, sizeof *t)))
		return kvp_fail(KVP_ENOMEM, "kvp_tenant_open: out of memory");
	t->quota = UINT64_MAX; /* bounded by the pool alone */
	if ((st = kvp_tenant_config_parse(&t->cfg, &t->quota, spec)) != KVP_OK ||
	    (st = kvp_cold_prepare(t)) != KVP_OK) {
		kvp_cold_unprepare(t);
		free(t);
		return st;
	}
	pthread_mutex_lock(&pool->lock);
	st = tenant_name_check(pool, name);
	if (st == KVP_OK)
		st = kvp_arena_create(pool, &t->arena);
	if (st == KVP_OK) {
		snprintf(t->name, sizeof t->name, "%s", name);
		t->pool = pool;
		t->flags = kvp_arena_flags(t->arena);
		/* memory relief is the tier's, reached through this hook: the allocator never calls up; with
		 * prefix=on, cached blocks no sequence holds go first */
		t->relieve = t->cfg.prefix ? kvp_prefix_relieve : pool->spill ? kvp_pressure_relieve : NULL;
		pthread_mutex_init(&t->lock, NULL);
		t->magic = KVP_TENANT_MAGIC;
		/* after the arena: what the policy loads once (a statistics file) is charged to the tenant */
		st = kvp_evict_prepare(t);
		if (st == KVP_OK) {
			t->handle = (kvp_tenant *)kvp_handle_new(KVP_HANDLE_TENANT, t, &t->handle_index);
			if (!t->handle_index)
				st = kvp_fail_context(KVP_ENOMEM, "kvp_tenant_open");
		}
		if (st != KVP_OK) {
			kvp_evict_unprepare(t);
			pthread_mutex_destroy(&t->lock);
			kvp_arena_destroy(t->arena);
		}
	}
	if (st == KVP_OK) {
		t->next = pool->tenants;
		pool->tenants = t;
	}
	pthread_mutex_unlock(&pool->lock);
	if (st != KVP_OK) {
		kvp_cold_unprepare(t);
		free(t);
		return st;
	}
	*out = t->handle;
	return KVP_OK;
}

void kvp_tenant_destroy(struct kvp_tenant_obj *t)
{
	kvp_handle_free(t->handle_index);
	t->handle_index = 0;
	while (t->seqs) {
		struct kvp_seq_obj *s = t->seqs;
		t->seqs = s->next;
		kvp_seq_destroy(s);
	}
	kvp_prefix_drop_tenant(t);
	kvp_evict_unprepare(t);
	kvp_cold_unprepare(t);
	kvp_arena_destroy(t->arena);
	pthread_mutex_destroy(&t->lock);
	t->magic = 0;
	free(t);
}

static void tenant_unlink_destroy(struct kvp_tenant_obj *t)
{
	struct kvp_pool_obj *pool = t->pool;
	pthread_mutex_lock(&pool->lock);
	for (struct kvp_tenant_obj **p = &pool->tenants; *p; p = &(*p)->next)
		if (*p == t) {
			*p = t->next;
			break;
		}
	pthread_mutex_unlock(&pool->lock);
	kvp_tenant_destroy(t);
}

void kvp_tenant_close(kvp_tenant *h)
{
	void *t;
	/* take: of two closes of one handle, only one gets the tenant */
	if (kvp_handle_take(KVP_HANDLE_TENANT, h, "kvp_tenant_close", &t) != KVP_OK)
		return;
	((struct kvp_tenant_obj *)t)->handle_index = 0;
	tenant_unlink_destroy(t);
}

/* ---- the spill device's test hooks, by the pool's handle as the host holds it ---- */

static struct kvp_spill *device_of(const kvp_pool *h)
{
	const struct kvp_pool_obj *pool = kvp_pool_from_handle(h);
	return pool ? pool->spill : NULL;
}

int kvp_spill_is_direct(const kvp_pool *h)
{
	return kvp_spill_device_direct(device_of(h));
}

int kvp_spill_is_registered(const kvp_pool *h)
{
	return kvp_spill_device_registered(device_of(h));
}

uint64_t kvp_spill_pages_used(const kvp_pool *h)
{
	return kvp_spill_device_pages_used(device_of(h));
}

uint64_t kvp_spill_pages_total(const kvp_pool *h)
{
	return kvp_spill_device_pages_total(device_of(h));
}

void kvp_spill_inject(kvp_pool *h, const struct kvp_spill_faults *f)
{
	kvp_spill_device_inject(device_of(h), f);
}
