/*
 * The prefix cache: prompt units a sequence has appended, found again by their token ids.
 *
 * A prompt is cut in units: the sink block (its first `sinks` tokens, when sinks > 0), then blocks of
 * `block` tokens; token i sits at position i. A unit is identified by a chain hash of the configuration
 * that made its blocks (model=, the shape, the tenant unless the pool shares prefixes, block, sinks,
 * store=), its parent unit's hash and its token ids, so a hit on unit u means the whole prompt up to it
 * matches. Lookups compare the hash, the identity and the token ids: a collision is a miss, never a
 * wrong block.
 *
 * A sequence opened by kvp_seq_open_prefix prepares one entry for each unit of its prompt that the
 * cache did not have (charged to its tenant as metadata at open: registering never allocates). Its
 * appends capture each unit's block per stream as soon as the block is full, exact and holds the
 * unit's positions as a run (kvp_prefix_capture, before the append's cold conversion replaces it);
 * once every stream of a unit is captured, the entry joins the table (kvp_prefix_register). Blocks are
 * never modified in place once full (appends copy a shared tail before writing, compaction and cold
 * conversion make fresh blocks), so a captured block keeps what was appended for good.
 *
 * A hit installs the entries' blocks by reference (the same tenant) or as copies charged to the hitting
 * tenant (share_prefix=1, another tenant's entry): memory never crosses tenants. Entries no sequence
 * holds are what pressure frees first, least recently used and deepest first (a parent outlives its
 * children, so a chain stays reachable from its start).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs/codec.h"
#include "kernels/crc32c.h"
#include "pager.h"
#include "tier/remote.h"

#define PREFIX_BUCKETS 1024u

/* What made a unit's blocks: only entries of the same identity can serve a lookup. */
struct prefix_identity {
	char model[64];
	kvp_shape shape;
	uint32_t block, sinks, store;
	const struct kvp_tenant_obj *tenant; /* NULL when the pool shares prefixes */
};

struct prefix_entry {
	struct prefix_entry *bucket_next;
	struct prefix_entry *prev, *next; /* every entry of the table, for relief and tenant close */
	struct kvp_tenant_obj *owner;
	struct prefix_identity id;
	uint64_t hash, parent; /* parent: 0 for a chain's first unit */
	uint64_t last_use;
	uint32_t unit;       /* depth in its chain */
	uint32_t children;   /* entries whose `up` this is */
	/* The parent entry this one counts on: a unit may be cached more than once (exact, and compressed per
	 * owner), and the count must come off the entry it went on. NULL for a chain's first unit, and once
	 * the parent's tenant closed with no other entry of the parent unit left. */
	struct prefix_entry *up;
	uint32_t publishing; /* publications reading it outside the table's lock: relief leaves it */
	uint32_t n_tokens, n_streams;
	/* Installed from a compressed value (the remote tier's ":c"): its blocks hold level-0 codes of the
	 * codecs cold_id names, and only its owner with those codecs may take it. */
	int cold;
	uint64_t cold_id;
	size_t bytes; /* the allocation */
	int32_t *tokens;              /* [n_tokens] */
	struct kvp_block **blocks;    /* [n_streams], NULL until captured */
};

struct kvp_prefix_table {
	pthread_mutex_t lock;
	uint64_t clock;
	struct prefix_entry *all;
	struct prefix_entry *bucket[PREFIX_BUCKETS];
};

/* A sequence's prompt units not yet registered. */
struct kvp_prefix_prompt {
	size_t bytes;
	uint32_t n_units;   /* whole units within the prompt */
	uint32_t next;      /* the first unit not registered */
	uint32_t n_streams;
	int failed;         /* a unit's block can no longer be captured: nothing more is registered */
	uint32_t *cursor;   /* [n_streams]: the first unit each stream has not captured */
	struct prefix_entry **entry; /* [n_units]: prepared entries, NULL below the first one and once registered */
};

static void prefix_publish(const struct kvp_seq_obj *s, const struct prefix_entry *e);

/* ---- the hash ---- */

/* One 64-bit word into the state: multiply-xorshift rounds, so every input bit reaches every state bit. */
static uint64_t hash_word(uint64_t h, uint64_t x)
{
	h ^= x * 0x9fb21c651e98df25ull;
	h = (h << 27 | h >> 37) * 0xd6e8feb86659fd93ull;
	return h ^ (h >> 31);
}

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
	const unsigned char *c = p;
	uint64_t w;
	for (; n >= 8; n -= 8, c += 8) {
		memcpy(&w, c, 8);
		h = hash_word(h, w);
	}
	w = n; /* the tail with its length: "ab" and "ab\0" differ */
	for (size_t i = 0; i < n; i++)
		w |= (uint64_t)c[i] << (8 * (i + 1));
	return hash_word(h, w);
}

static uint64_t hash_end(uint64_t h)
{
	h ^= h >> 33;
	h *= 0xa0761d6478bd642full;
	h ^= h >> 29;
	h *= 0xe7037ed1a0b428dbull;
	h ^= h >> 32;
	return h ? h : 1; /* 0 means "no parent" */
}

static uint64_t identity_hash(const struct prefix_identity *id, const char *tenant_name)
{
	uint32_t theta;
	uint64_t h = 0x6b7670726566ull; /* "kvpref" */
	memcpy(&theta, &id->shape.rope_theta, sizeof theta);
	h = hash_bytes(h, id->model, strlen(id->model));
	h = hash_word(h, (uint64_t)id->shape.n_layers << 32 | id->shape.n_heads);
	h = hash_word(h, (uint64_t)id->shape.n_kv_heads << 32 | id->shape.head_dim);
	h = hash_word(h, (uint64_t)theta << 32 | (uint32_t)id->shape.rope_layout);
	h = hash_bytes(h, tenant_name, strlen(tenant_name));
	h = hash_word(h, (uint64_t)id->block << 32 | id->sinks);
	return hash_word(h, id->store);
}

static uint64_t unit_hash(uint64_t id_hash, uint64_t parent, const int32_t *tokens, uint32_t n)
{
	uint64_t h = hash_word(hash_word(id_hash, parent), n);
	for (uint32_t i = 0; i + 1 < n; i += 2)
		h = hash_word(h, (uint64_t)(uint32_t)tokens[i] << 32 | (uint32_t)tokens[i + 1]);
	if (n & 1)
		h = hash_word(h, (uint32_t)tokens[n - 1]);
	return hash_end(h);
}

static void identity_of(const struct kvp_tenant_obj *t, const kvp_shape *shape, struct prefix_identity *id)
{
	memset(id, 0, sizeof *id);
	memcpy(id->model, t->cfg.model, sizeof id->model);
	id->shape = *shape;
	id->block = t->cfg.block;
	id->sinks = t->cfg.sinks;
	id->store = t->cfg.store;
	id->tenant = t->pool->share_prefix ? NULL : t;
}

static int identity_equal(const struct prefix_identity *a, const struct prefix_identity *b)
{
	return !strcmp(a->model, b->model) && a->shape.n_layers == b->shape.n_layers &&
	       a->shape.n_heads == b->shape.n_heads && a->shape.n_kv_heads == b->shape.n_kv_heads &&
	       a->shape.head_dim == b->shape.head_dim && !memcmp(&a->shape.rope_theta, &b->shape.rope_theta,
								  sizeof a->shape.rope_theta) &&
	       a->shape.rope_layout == b->shape.rope_layout && a->block == b->block && a->sinks == b->sinks &&
	       a->store == b->store && a->tenant == b->tenant;
}

/* ---- units ---- */

static uint32_t unit_start(const struct kvp_tenant_config *c, uint32_t u)
{
	if (!c->sinks)
		return u * c->block;
	return u ? c->sinks + (u - 1) * c->block : 0;
}

static uint32_t unit_len(const struct kvp_tenant_config *c, uint32_t u)
{
	return u == 0 && c->sinks ? c->sinks : c->block;
}

/* Whole units within the first n tokens. */
static uint32_t units_within(const struct kvp_tenant_config *c, uint32_t n)
{
	if (!c->sinks)
		return n / c->block;
	return n < c->sinks ? 0 : 1 + (n - c->sinks) / c->block;
}

/* ---- the table (callers hold its lock) ---- */

kvp_status kvp_prefix_table_open(struct kvp_pool_obj *pool)
{
	if (!(pool->prefix = calloc(1, sizeof *pool->prefix)))
		return kvp_fail(KVP_ENOMEM, "kvp_pool_open: out of memory");
	pthread_mutex_init(&pool->prefix->lock, NULL);
	return KVP_OK;
}

/* After every tenant is closed, which dropped the entries. */
void kvp_prefix_table_close(struct kvp_pool_obj *pool)
{
	if (!pool->prefix)
		return;
	pthread_mutex_destroy(&pool->prefix->lock);
	free(pool->prefix);
	pool->prefix = NULL;
}

#define FIND_ANY (-1) /* find's `cold`: an exact (0) or a cold (1) entry, or either */

static struct prefix_entry *find(const struct kvp_prefix_table *tab, uint64_t hash, const struct prefix_identity *id,
				 const int32_t *tokens, uint32_t n, int cold)
{
	for (struct prefix_entry *e = tab->bucket[hash % PREFIX_BUCKETS]; e; e = e->bucket_next)
		if (e->hash == hash && identity_equal(&e->id, id) && (cold == FIND_ANY || e->cold == cold) &&
		    (!tokens || (e->n_tokens == n && !memcmp(e->tokens, tokens, n * sizeof *tokens))))
			return e;
	return NULL;
}

/* A cold entry of owner's whose codes are those of the codecs cold_id names (with share_prefix=1 several
 * tenants may hold the same unit cold: each reads only its own). */
static struct prefix_entry *find_cold(const struct kvp_prefix_table *tab, uint64_t hash,
				      const struct prefix_identity *id, const int32_t *tokens, uint32_t n,
				      const struct kvp_tenant_obj *owner, uint64_t cold_id)
{
	for (struct prefix_entry *e = tab->bucket[hash % PREFIX_BUCKETS]; e; e = e->bucket_next)
		if (e->cold && e->owner == owner && e->cold_id == cold_id && e->hash == hash &&
		    identity_equal(&e->id, id) && e->n_tokens == n && !memcmp(e->tokens, tokens, n * sizeof *tokens))
			return e;
	return NULL;
}

static void entry_free(struct prefix_entry *e)
{
	for (uint32_t i = 0; i < e->n_streams; i++)
		kvp_block_put(e->owner, e->blocks[i]);
	kvp_free(e->owner, e, e->bytes, KVP_BYTES_META);
}

static void entry_link(struct kvp_prefix_table *tab, struct prefix_entry *e)
{
	struct prefix_entry **b = &tab->bucket[e->hash % PREFIX_BUCKETS];
	e->bucket_next = *b;
	*b = e;
	e->prev = NULL;
	e->next = tab->all;
	if (tab->all)
		tab->all->prev = e;
	tab->all = e;
	e->last_use = ++tab->clock;
}

static void entry_unlink_free(struct kvp_prefix_table *tab, struct prefix_entry *e)
{
	for (struct prefix_entry **b = &tab->bucket[e->hash % PREFIX_BUCKETS]; *b; b = &(*b)->bucket_next)
		if (*b == e) {
			*b = e->bucket_next;
			break;
		}
	if (e->prev)
		e->prev->next = e->next;
	else
		tab->all = e->next;
	if (e->next)
		e->next->prev = e->prev;
	if (e->up)
		e->up->children--;
	entry_free(e);
}

/* No sequence holds any of its blocks (and no publication reads them): freeing it frees them. */
static int unowned(const struct prefix_entry *e)
{
	if (e->publishing)
		return 0;
	for (uint32_t i = 0; i < e->n_streams; i++)
		if (atomic_load_explicit(&e->blocks[i]->refs, memory_order_acquire) > 1)
			return 0;
	return 1;
}

/* ---- relief, stats, close ---- */

/* Frees the least recently used of t's entries that no sequence holds and no entry descends from;
 * returns 1 when there was one. */
static int drop_one_unowned(struct kvp_tenant_obj *t)
{
	struct kvp_prefix_table *tab = t->pool->prefix;
	struct prefix_entry *victim = NULL;
	pthread_mutex_lock(&tab->lock);
	for (struct prefix_entry *e = tab->all; e; e = e->next)
		if (e->owner == t && !e->children && unowned(e) &&
		    (!victim || e->last_use < victim->last_use ||
		     (e->last_use == victim->last_use && e->unit > victim->unit)))
			victim = e;
	if (victim)
		entry_unlink_free(tab, victim);
	pthread_mutex_unlock(&tab->lock);
	return victim != NULL;
}

int kvp_prefix_relieve(struct kvp_tenant_obj *t, uint64_t bytes, struct kvp_call *call)
{
	if (drop_one_unowned(t))
		return 1;
	return t->pool->spill ? kvp_pressure_relieve(t, bytes, call) : 0;
}

/* An entry of the parent unit of e's not owned by t (share_prefix=1: chains cross tenants). */
static struct prefix_entry *parent_outside(const struct kvp_prefix_table *tab, const struct prefix_entry *e,
					   const struct kvp_tenant_obj *t)
{
	for (struct prefix_entry *p = tab->bucket[e->parent % PREFIX_BUCKETS]; p; p = p->bucket_next)
		if (p->owner != t && p->hash == e->parent && identity_equal(&p->id, &e->id))
			return p;
	return NULL;
}

/* Relief never frees a parent with children, but a tenant's close frees all its entries: first, what
 * counts on them moves to another entry of the same unit (an entry of t's own needs none: it goes too). */
static void move_children_off(struct kvp_prefix_table *tab, const struct kvp_tenant_obj *t)
{
	for (struct prefix_entry *e = tab->all; e; e = e->next)
		if (e->up && e->up->owner == t) {
			e->up->children--;
			e->up = e->owner == t ? NULL : parent_outside(tab, e, t);
			if (e->up)
				e->up->children++;
		}
}

void kvp_prefix_drop_tenant(struct kvp_tenant_obj *t)
{
	struct kvp_prefix_table *tab = t->pool ? t->pool->prefix : NULL;
	struct prefix_entry *e, *next;
	if (!tab)
		return;
	pthread_mutex_lock(&tab->lock);
	move_children_off(tab, t);
	for (e = tab->all; e; e = next) {
		next = e->next;
		if (e->owner == t)
			entry_unlink_free(tab, e);
	}
	pthread_mutex_unlock(&tab->lock);
}

uint64_t kvp_prefix_bytes_cached(const struct kvp_tenant_obj *t)
{
	struct kvp_prefix_table *tab = t->pool->prefix;
	uint64_t bytes = 0;
	if (!tab)
		return 0;
	pthread_mutex_lock(&tab->lock);
	for (const struct prefix_entry *e = tab->all; e; e = e->next)
		for (uint32_t i = 0; e->owner == t && i < e->n_streams; i++)
			if (atomic_load_explicit(&e->blocks[i]->refs, memory_order_acquire) == 1)
				bytes += kvp_block_bytes(t, e->blocks[i]);
	pthread_mutex_unlock(&tab->lock);
	return bytes;
}

/* ---- a sequence's prompt ---- */

static size_t entry_bytes(uint32_t n_tokens, uint32_t n_streams)
{
	return sizeof(struct prefix_entry) + (size_t)n_streams * sizeof(struct kvp_block *) +
	       (size_t)n_tokens * sizeof(int32_t);
}

static struct prefix_entry *entry_new(struct kvp_tenant_obj *t, const struct prefix_identity *id, uint32_t unit,
				      const int32_t *tokens, uint32_t n_tokens, uint32_t n_streams, uint64_t hash,
				      uint64_t parent)
{
	size_t bytes = entry_bytes(n_tokens, n_streams);
	struct prefix_entry *e = kvp_alloc(t, bytes, KVP_BYTES_META, NULL);
	if (!e)
		return NULL;
	memset(e, 0, bytes);
	e->owner = t;
	e->id = *id;
	e->hash = hash;
	e->parent = parent;
	e->unit = unit;
	e->n_tokens = n_tokens;
	e->n_streams = n_streams;
	e->bytes = bytes;
	e->blocks = (struct kvp_block **)(e + 1);
	e->tokens = (int32_t *)(e->blocks + n_streams);
	memcpy(e->tokens, tokens, n_tokens * sizeof *tokens);
	return e;
}

void kvp_prefix_prompt_free(struct kvp_seq_obj *s)
{
	struct kvp_prefix_prompt *p = s->prompt;
	if (!p)
		return;
	for (uint32_t u = 0; u < p->n_units; u++)
		if (p->entry[u])
			entry_free(p->entry[u]);
	kvp_free(s->tenant, p, p->bytes, KVP_BYTES_META);
	s->prompt = NULL;
}

size_t kvp_prefix_prompt_bytes(const struct kvp_seq_obj *s)
{
	const struct kvp_prefix_prompt *p = s->prompt;
	size_t bytes = p ? kvp_alloc_size(s->tenant, p->bytes) : 0;
	for (uint32_t u = 0; p && u < p->n_units; u++)
		if (p->entry[u])
			bytes += kvp_alloc_size(s->tenant, p->entry[u]->bytes);
	return bytes;
}

/* Entries for units first..n_units-1 of the prompt, with their hashes: all of them or nothing. */
static kvp_status prompt_prepare(struct kvp_seq_obj *s, const struct prefix_identity *id, const int32_t *tokens,
				 uint32_t n_units, uint32_t first, const uint64_t *hashes)
{
	struct kvp_tenant_obj *t = s->tenant;
	uint32_t n_streams = s->shape.n_layers * s->shape.n_kv_heads;
	size_t bytes = sizeof(struct kvp_prefix_prompt) + (size_t)n_units * sizeof(struct prefix_entry *) +
		       (size_t)n_streams * sizeof(uint32_t);
	struct kvp_prefix_prompt *p;
	if (first >= n_units)
		return KVP_OK;
	if (!(p = kvp_alloc(t, bytes, KVP_BYTES_META, NULL)))
		return KVP_ENOMEM;
	memset(p, 0, bytes);
	p->bytes = bytes;
	p->n_units = n_units;
	p->next = first;
	p->n_streams = n_streams;
	p->entry = (struct prefix_entry **)(p + 1);
	p->cursor = (uint32_t *)(p->entry + n_units);
	for (uint32_t i = 0; i < n_streams; i++)
		p->cursor[i] = first;
	s->prompt = p;
	for (uint32_t u = first; u < n_units; u++) {
		p->entry[u] = entry_new(t, id, u, tokens + unit_start(&t->cfg, u), unit_len(&t->cfg, u), n_streams,
					hashes[u], u ? hashes[u - 1] : 0);
		if (!p->entry[u]) {
			kvp_prefix_prompt_free(s);
			return KVP_ENOMEM;
		}
	}
	return KVP_OK;
}

/* The block that holds unit u in a stream, where the stream's tokens are the appended prompt. */
static struct kvp_block *unit_block(const struct kvp_tenant_config *c, const struct kvp_stream *st, uint32_t u,
				    int *last)
{
	uint32_t i = c->sinks ? u - 1 : u;
	if (c->sinks && u == 0) {
		*last = 1; /* a sink block that is not full yet takes the next tokens */
		return st->sink;
	}
	*last = i + 1 == st->n_blocks;
	return i < st->n_blocks ? st->blocks[i] : NULL;
}

enum capture { CAPTURE_WAIT, CAPTURE_TAKE, CAPTURE_NEVER };

/* Whether the block holds exactly the unit's appended tokens, exact and in memory. */
static enum capture capture_state(const struct kvp_tenant_config *c, const struct kvp_block *b, int last, uint32_t u)
{
	if (!b || (!b->n && last))
		return CAPTURE_WAIT;
	if (b->store == KVP_STORE_CODEC || b->spilled || b->positions || b->pos_base != (int32_t)unit_start(c, u))
		return CAPTURE_NEVER;
	if (b->n < unit_len(c, u))
		return last ? CAPTURE_WAIT : CAPTURE_NEVER;
	return CAPTURE_TAKE;
}

void kvp_prefix_capture(const struct kvp_seq_obj *s, struct kvp_stream *st)
{
	struct kvp_prefix_prompt *p = s->prompt;
	const struct kvp_tenant_config *c = &s->tenant->cfg;
	size_t i = (size_t)(st - s->streams);
	if (!p || p->failed)
		return;
	while (p->cursor[i] < p->n_units) {
		uint32_t u = p->cursor[i];
		int last;
		struct kvp_block *b = unit_block(c, st, u, &last);
		enum capture cs = capture_state(c, b, last, u);
		if (cs == CAPTURE_NEVER)
			p->failed = 1;
		if (cs != CAPTURE_TAKE)
			return;
		kvp_block_get(b);
		p->entry[u]->blocks[i] = b;
		p->cursor[i]++;
	}
}

/* Unit p->next joins the table when its parent is still there; an equal entry already there (another
 * sequence registered the same unit) serves instead, and counts on the parent if it has none. 0 when the
 * chain is broken; *joined is the entry when it joined. */
static int register_next(struct kvp_prefix_table *tab, struct kvp_prefix_prompt *p, struct prefix_entry **joined)
{
	struct prefix_entry *e = p->entry[p->next], *parent = NULL, *same;
	*joined = NULL;
	if (e->unit && !(parent = find(tab, e->parent, &e->id, NULL, 0, FIND_ANY)))
		return 0;
	p->entry[p->next++] = NULL;
	if ((same = find(tab, e->hash, &e->id, e->tokens, e->n_tokens, 0))) {
		same->last_use = ++tab->clock;
		if (!same->up && parent) /* its parent's tenant closed: the chain is whole again */
			(same->up = parent)->children++;
		entry_free(e);
		return 1;
	}
	entry_link(tab, e);
	if ((e->up = parent))
		parent->children++;
	*joined = e;
	return 1;
}

#define PUBLISH_BATCH 16u

/*
 * Units join the table under its lock, a batch at a time, and are published after it is released: a
 * publication copies every stream's block and may encode them all (milliseconds for a real model's unit),
 * which other sequences' lookups and registrations must not wait for. Meanwhile the batch's entries are
 * marked publishing, so relief does not free them; they are immutable once in the table.
 */
void kvp_prefix_register(struct kvp_seq_obj *s)
{
	struct kvp_prefix_prompt *p = s->prompt;
	struct kvp_prefix_table *tab = s->tenant->pool->prefix;
	const int remote = s->tenant->pool->remote != NULL;
	uint32_t ready = UINT32_MAX;
	if (!p)
		return;
	for (uint32_t i = 0; i < p->n_streams; i++)
		ready = p->cursor[i] < ready ? p->cursor[i] : ready;
	while (!p->failed && p->next < ready) {
		struct prefix_entry *batch[PUBLISH_BATCH], *e;
		uint32_t n = 0;
		pthread_mutex_lock(&tab->lock);
		while (p->next < ready && !p->failed && n < PUBLISH_BATCH) {
			if (!register_next(tab, p, &e))
				p->failed = 1;
			else if (e && remote)
				e->publishing++, batch[n++] = e;
		}
		pthread_mutex_unlock(&tab->lock);
		for (uint32_t i = 0; i < n; i++)
			prefix_publish(s, batch[i]);
		if (!n)
			continue;
		pthread_mutex_lock(&tab->lock);
		for (uint32_t i = 0; i < n; i++)
			batch[i]->publishing--;
		pthread_mutex_unlock(&tab->lock);
	}
	/* the prompt's memory goes once nothing more can be registered */
	if (p->failed || p->next == p->n_units)
		kvp_prefix_prompt_free(s);
}

/*
 * ---- values: one unit as a tier beyond the pool (the remote tier) stores it ----
 * One record of tier/remote.h's format per stream, layer by layer, back to back. A record's identity is
 * the unit's chain hash, the stream's layer and KV head, the unit's tokens, the store, and as its codec
 * id the hash of the tenant's identity (model, shape, namespace, block, sinks, store); its payload is the
 * block's k rows, then its v rows, as stored. Token ids are not stored: the chain hash a reader computes
 * from its own prompt names them, and every field of every record must be what the reader expects.
 */

static size_t row_bytes(uint32_t dim, uint32_t store)
{
	return (size_t)dim * (store == KVP_STORE_FP16 ? sizeof(uint16_t) : sizeof(float));
}

/* What the tenant's units are hashed under: the tenant, unless the pool shares prefixes. */
static const char *namespace_of(const struct kvp_tenant_obj *t)
{
	return t->pool->share_prefix ? "" : t->name;
}

/*
 * How a sequence's cold tier encodes blocks, when other pools may take its units compressed: only where
 * a block's codes depend on its rows alone and a block turns cold by its place alone. With a policy a
 * block turns cold once a round scored it; a gate or ladder picks a level per head; a codec context is
 * fitted on the stream's own tokens. id 0: units go exact only.
 */
struct cold_form {
	uint64_t id;             /* the records' codec id: the identity's hash mixed with k= and v= */
	size_t k_bytes, v_bytes; /* one block's codes */
	const struct kvp_codec *k, *v; /* which check a fetched block's codes */
};

static void cold_form_of(const struct kvp_seq_obj *s, uint64_t idh, struct cold_form *f)
{
	const struct kvp_tenant_config *c = &s->tenant->cfg;
	const struct kvp_codec *k = s->cold.k, *v = s->cold.v;
	memset(f, 0, sizeof *f);
	if (!k || !v || c->policy_spec[0] || s->gating || kvp_gating_levels(&c->gating) != 1 || k->ctx_bytes ||
	    v->ctx_bytes)
		return;
	f->id = hash_end(hash_bytes(hash_bytes(hash_word(idh, 0x636f6c64 /* "cold" */), c->k_spec, strlen(c->k_spec)),
				    c->v_spec, strlen(c->v_spec)));
	f->k_bytes = k->ops->bytes(k, c->block);
	f->v_bytes = v->ops->bytes(v, c->block);
	f->k = k;
	f->v = v;
}

/* Blocks a sequence that appended the first n tokens holds cold (kvp_cold's rule without a policy: a
 * full block turns cold once `window` tokens follow it, counted over the tokens after the sink). */
static uint32_t cold_blocks_within(const struct kvp_tenant_config *c, uint32_t n)
{
	uint32_t after_sink = !c->sinks ? n : n > c->sinks ? n - c->sinks : 0;
	return after_sink >= c->window ? (after_sink - c->window) / c->block : 0;
}

/* Stream i's record identity in a unit's value: exact rows (f NULL) or codes of f's codecs. */
static void stream_record_id(const struct prefix_identity *id, uint64_t idh, const struct cold_form *f, uint64_t hash,
			     uint32_t n_tokens, uint32_t i, struct kvp_record_id *rid)
{
	*rid = (struct kvp_record_id){
		.chain = hash,
		.layer = i / id->shape.n_kv_heads,
		.kv_head = i % id->shape.n_kv_heads,
		.tokens = n_tokens,
		.store = id->store,
		.codec = idh,
		.payload = 2 * (size_t)n_tokens * row_bytes(id->shape.head_dim, id->store),
	};
	if (f) {
		rid->store = KVP_STORE_CODEC;
		rid->codec = f->id;
		rid->payload = f->k_bytes + f->v_bytes;
	}
}

static size_t unit_value_bytes(const struct prefix_identity *id, uint32_t n_tokens)
{
	size_t rows = (size_t)n_tokens * row_bytes(id->shape.head_dim, id->store);
	return (size_t)id->shape.n_layers * id->shape.n_kv_heads * (KVP_RECORD_HEADER + 2 * rows);
}

/* The entry's value, malloc'd (NULL when out of memory); idh: the hash of its identity. */
static void *unit_value_make(const struct prefix_entry *e, uint64_t idh, size_t *bytes)
{
	const size_t rows = (size_t)e->n_tokens * row_bytes(e->id.shape.head_dim, e->id.store);
	unsigned char *value, *payload = malloc(2 * rows);
	size_t at = 0, used;
	*bytes = unit_value_bytes(&e->id, e->n_tokens);
	if (!payload || !(value = malloc(*bytes))) {
		free(payload);
		return NULL;
	}
	for (uint32_t i = 0; i < e->n_streams; i++, at += used) {
		struct kvp_record_id rid;
		stream_record_id(&e->id, idh, NULL, e->hash, e->n_tokens, i, &rid);
		memcpy(payload, e->blocks[i]->k, rows);
		memcpy(payload + rows, e->blocks[i]->v, rows);
		kvp_record_pack(&rid, payload, value + at, *bytes - at, &used); /* sized above: cannot fail */
	}
	free(payload);
	return value;
}

/* The entry's compressed value: each block's level-0 codes as s's cold tier makes them when it turns cold,
 * malloc'd; NULL when out of memory or a block does not encode. */
static void *unit_value_make_cold(const struct kvp_seq_obj *s, const struct prefix_entry *e,
				  const struct cold_form *f, size_t *bytes)
{
	const size_t codes = f->k_bytes + f->v_bytes;
	unsigned char *value = NULL, *payload = malloc(codes);
	float *rows = malloc((size_t)2 * e->n_tokens * e->id.shape.head_dim * sizeof *rows);
	size_t at = 0, used;
	*bytes = (size_t)e->n_streams * (KVP_RECORD_HEADER + codes);
	if (payload && rows)
		value = malloc(*bytes);
	for (uint32_t i = 0; value && i < e->n_streams; i++, at += used) {
		struct kvp_record_id rid;
		stream_record_id(&e->id, 0, f, e->hash, e->n_tokens, i, &rid);
		if (kvp_cold_encode_block(s, e->blocks[i], rows, payload, payload + f->k_bytes) != KVP_OK) {
			free(value);
			value = NULL;
			break;
		}
		kvp_record_pack(&rid, payload, value + at, *bytes - at, &used); /* sized above: cannot fail */
	}
	free(payload);
	free(rows);
	return value;
}

/* One stream's block of unit e from its record's payload: exact rows (f NULL) or f's codes, which must be
 * codes its encoders write (a checksum says the bytes are the publisher's, not that they are sound). */
static kvp_status unit_block_from(struct kvp_tenant_obj *t, const struct prefix_entry *e, const struct cold_form *f,
				  const unsigned char *payload, struct kvp_block **out)
{
	const size_t rows = (size_t)e->n_tokens * row_bytes(e->id.shape.head_dim, e->id.store);
	struct kvp_block *b;
	kvp_status st;
	*out = NULL;
	if (f && ((st = kvp_codec_check(f->k, e->n_tokens, payload)) != KVP_OK ||
		  (st = kvp_codec_check(f->v, e->n_tokens, payload + f->k_bytes)) != KVP_OK))
		return st;
	if (f && (b = kvp_block_new_cold(t, e->n_tokens, f->k_bytes, f->v_bytes, NULL))) {
		memcpy(b->k, payload, f->k_bytes);
		memcpy(b->v, payload + f->k_bytes, f->v_bytes);
		b->level = 0;
	} else if (!f && (b = kvp_block_new(t, e->n_tokens, e->id.shape.head_dim, (enum kvp_store)e->id.store, NULL))) {
		memcpy(b->k, payload, rows);
		memcpy(b->v, payload + rows, rows);
	} else
		return KVP_ENOMEM;
	b->n = (uint16_t)e->n_tokens;
	b->pos_base = (int32_t)unit_start(&t->cfg, e->unit);
	*out = b;
	return KVP_OK;
}

/* Unit u's blocks from its value, checked record by record against what t expects, into e. */
static kvp_status unit_value_blocks(struct kvp_tenant_obj *t, uint64_t idh, const struct cold_form *f,
				    const unsigned char *value, size_t bytes, struct prefix_entry *e)
{
	size_t at = 0, used;
	for (uint32_t i = 0; i < e->n_streams; i++, at += used) {
		struct kvp_record_id rid;
		const unsigned char *payload;
		kvp_status st;
		stream_record_id(&e->id, idh, f, e->hash, e->n_tokens, i, &rid);
		if ((st = kvp_record_unpack(&rid, value + at, bytes - at, (const void **)&payload, &used)) == KVP_OK)
			st = unit_block_from(t, e, f, payload, &e->blocks[i]);
		if (st == KVP_ECORRUPT)
			return kvp_fail_context(st, "prefix value of unit %u, layer %u, KV head %u", e->unit, rid.layer,
						rid.kv_head);
		if (st != KVP_OK)
			return st;
	}
	if (at != bytes)
		return kvp_fail(KVP_ECORRUPT, "prefix value of unit %u: %zu bytes after its records", e->unit, bytes - at);
	return KVP_OK;
}

/* Installs unit u of the prompt `tokens` (hashes: the prompt's chain) from its value as t's entry. */
static kvp_status unit_value_install(struct kvp_tenant_obj *t, const struct prefix_identity *id, uint64_t idh,
				     const struct cold_form *f, const int32_t *tokens, const uint64_t *hashes, uint32_t u, const void *value,
				     size_t bytes)
{
	const struct kvp_tenant_config *c = &t->cfg;
	struct kvp_prefix_table *tab = t->pool->prefix;
	struct prefix_entry *e, *parent = NULL;
	uint32_t n_streams = id->shape.n_layers * id->shape.n_kv_heads;
	kvp_status st;
	if (!(e = entry_new(t, id, u, tokens + unit_start(c, u), unit_len(c, u), n_streams, hashes[u],
			    u ? hashes[u - 1] : 0)))
		return KVP_ENOMEM;
	e->cold = f != NULL;
	e->cold_id = f ? f->id : 0;
	if ((st = unit_value_blocks(t, idh, f, value, bytes, e)) != KVP_OK) {
		entry_free(e);
		return st;
	}
	pthread_mutex_lock(&tab->lock);
	if (u && !(parent = find(tab, e->parent, id, NULL, 0, FIND_ANY)))
		st = kvp_fail(KVP_EINVAL, "prefix value: unit %u's parent is not cached (a chain installs from its "
			      "start)", u);
	else if (e->cold ? find_cold(tab, e->hash, id, e->tokens, e->n_tokens, t, e->cold_id) != NULL
			 : find(tab, e->hash, id, e->tokens, e->n_tokens, 0) != NULL)
		st = KVP_OK; /* cached meanwhile: ours is not needed */
	else {
		entry_link(tab, e);
		if ((e->up = parent))
			parent->children++;
		e = NULL;
	}
	pthread_mutex_unlock(&tab->lock);
	if (e)
		entry_free(e);
	return st;
}

/* The chain hashes of the prompt's first n_units units under t's identity. */
static void chain_hashes(const struct kvp_tenant_obj *t, uint64_t idh, const int32_t *tokens, uint32_t n_units,
			 uint64_t *hashes)
{
	const struct kvp_tenant_config *c = &t->cfg;
	for (uint32_t u = 0; u < n_units; u++)
		hashes[u] = unit_hash(idh, u ? hashes[u - 1] : 0, tokens + unit_start(c, u), unit_len(c, u));
}

kvp_status kvp_prefix_record_make(struct kvp_tenant_obj *t, const kvp_shape *shape, const int32_t *tokens,
				  uint32_t unit, void **rec, size_t *bytes)
{
	struct kvp_prefix_table *tab = t->pool->prefix;
	const struct kvp_tenant_config *c = &t->cfg;
	struct prefix_identity id;
	struct prefix_entry *e;
	uint64_t idh, *hashes = malloc(((size_t)unit + 1) * sizeof *hashes);
	*rec = NULL;
	*bytes = 0;
	if (!hashes)
		return kvp_fail(KVP_ENOMEM, "prefix value: out of memory");
	identity_of(t, shape, &id);
	idh = identity_hash(&id, namespace_of(t));
	chain_hashes(t, idh, tokens, unit + 1, hashes);
	pthread_mutex_lock(&tab->lock);
	if ((e = find(tab, hashes[unit], &id, tokens + unit_start(c, unit), unit_len(c, unit), 0)))
		*rec = unit_value_make(e, idh, bytes);
	pthread_mutex_unlock(&tab->lock);
	free(hashes);
	if (!e)
		return kvp_fail(KVP_EINVAL, "prefix value: unit %u of the prompt is not cached", unit);
	return *rec ? KVP_OK : kvp_fail(KVP_ENOMEM, "prefix value: out of memory for %zu bytes", *bytes);
}

kvp_status kvp_prefix_record_install(struct kvp_tenant_obj *t, const kvp_shape *shape, const int32_t *tokens,
				     uint32_t unit, const void *rec, size_t bytes)
{
	struct prefix_identity id;
	uint64_t idh, *hashes = malloc(((size_t)unit + 1) * sizeof *hashes);
	kvp_status st;
	if (!hashes)
		return kvp_fail(KVP_ENOMEM, "prefix value: out of memory");
	identity_of(t, shape, &id);
	idh = identity_hash(&id, namespace_of(t));
	chain_hashes(t, idh, tokens, unit + 1, hashes);
	st = unit_value_install(t, &id, idh, NULL, tokens, hashes, unit, rec, bytes);
	free(hashes);
	return st;
}

/* ---- the remote tier (tier/remote.h) ----
 * Keys: "kvp:<model>:<tenant>:<chain hash, 16 hex digits>", the tenant "*" when the pool shares prefixes;
 * the same + ":c" for a block unit's compressed value (cold_form_of says when there is one).
 * A registered unit is published write-behind; a lookup that misses locally asks the remote tier for the
 * rest of the chain in one pipelined round trip and installs the run of units it gets, in order, each
 * checked first. Whatever fails (a fault, a miss, a value that fails its checks) ends the run there. */

#define KEY_MAX (4 + 64 + 1 + 64 + 1 + 16 + 2 + 1)

static size_t unit_key(const struct prefix_identity *id, const struct kvp_tenant_obj *owner, uint64_t hash,
		       int cold, char key[KEY_MAX])
{
	int n = snprintf(key, KEY_MAX, "kvp:%s:%s:%016llx%s", id->model, id->tenant ? owner->name : "*",
			 (unsigned long long)hash, cold ? ":c" : "");
	return n < 0 ? 0 : (size_t)n < KEY_MAX ? (size_t)n : KEY_MAX - 1;
}

/* Outside the table's lock, inside s's append (its codecs are free to use): copies of the values go to the
 * publication queue, nothing waits. A block unit whose codes s's cold tier would make from its rows alone
 * goes compressed too, under its key + ":c"; the sink unit never turns cold, so it goes exact only. The
 * publication is best effort and the append succeeds either way: a block that does not encode leaves no
 * message behind for kvp_last_error. */
static void prefix_publish(const struct kvp_seq_obj *s, const struct prefix_entry *e)
{
	struct kvp_remote *r = s->tenant->pool->remote;
	char key[KEY_MAX], note[512];
	size_t bytes, key_len;
	struct cold_form f;
	uint64_t idh;
	void *value;
	idh = identity_hash(&e->id, namespace_of(e->owner));
	if (!(value = unit_value_make(e, idh, &bytes)))
		return;
	key_len = unit_key(&e->id, e->owner, e->hash, 0, key);
	kvp_remote_publish(r, key, key_len, value, bytes);
	free(value);
	cold_form_of(s, idh, &f);
	if (!f.id || (s->tenant->cfg.sinks && e->unit == 0))
		return;
	snprintf(note, sizeof note, "%s", kvp_last_error());
	value = unit_value_make_cold(s, e, &f, &bytes);
	kvp_fail(KVP_OK, "%s", note);
	if (!value)
		return;
	key_len = unit_key(&e->id, e->owner, e->hash, 1, key);
	kvp_remote_publish(r, key, key_len, value, bytes);
	free(value);
}

/* What a remote lookup did: the units it installed, and why it stopped short, for the caller's stats. */
struct remote_outcome {
	uint32_t installed;
	uint64_t faults;   /* 1 when a fault, a refusal or a backoff left units unanswered */
	uint32_t rejected; /* values that failed their checks */
	char note[256];
};

/* Units [from, to) of the prompt from the remote tier in one round trip, installed in order until the
 * first one that is missing or fails its checks: units [cold_from, cold_to) as f's compressed values (":c"),
 * the rest exact. Outside the table's lock: installs allocate, and a charge may relieve, which takes it. */
static void prefix_fetch_remote(struct kvp_tenant_obj *t, const struct prefix_identity *id, uint64_t idh,
				const struct cold_form *f, const int32_t *tokens, const uint64_t *hashes,
				uint32_t from, uint32_t to, uint32_t cold_from, uint32_t cold_to,
				struct remote_outcome *out)
{
	struct kvp_remote *r = t->pool->remote;
	struct kvp_remote_counters faults;
	uint32_t n = to - from, unanswered;
	char *keys = malloc((size_t)n * KEY_MAX);
	const char **key = malloc((size_t)n * sizeof *key);
	size_t *key_len = malloc((size_t)n * sizeof *key_len), *val_len = malloc((size_t)n * sizeof *val_len);
	void **val = calloc(n, sizeof *val);
	memset(out, 0, sizeof *out);
	if (keys && key && key_len && val_len && val) {
		for (uint32_t i = 0; i < n; i++) {
			key[i] = keys + (size_t)i * KEY_MAX;
			key_len[i] = unit_key(id, t, hashes[from + i], from + i >= cold_from && from + i < cold_to, keys + (size_t)i * KEY_MAX);
		}
		kvp_remote_fetch(r, n, key, key_len, val, val_len, &unanswered);
		if (unanswered) {
			kvp_remote_counters(r, &faults);
			out->faults = 1;
			snprintf(out->note, sizeof out->note, "%u of %u units unanswered (%.160s)", unanswered, n,
				 faults.note[0] ? faults.note : "no server answered");
		}
		for (uint32_t i = 0; i < n && val[i]; i++) {
			kvp_status st = unit_value_install(t, id, idh, from + i >= cold_from && from + i < cold_to ? f : NULL, tokens, hashes,
							   from + i, val[i], val_len[i]);
			if (st != KVP_OK) {
				out->rejected += st == KVP_ECORRUPT;
				if (st == KVP_ECORRUPT)
					snprintf(out->note, sizeof out->note, "%.200s", kvp_last_error());
				break;
			}
			out->installed++;
		}
		for (uint32_t i = 0; i < n; i++)
			kvp_remote_value_free(val[i]);
	}
	free(keys), free(key), free(key_len), free(val_len), free(val);
}

/* ---- lookup and install ---- */

/* What a lookup found: per unit, one block per stream (references the sequence takes over). */
struct prefix_hit {
	uint32_t units, n_streams;
	uint32_t cold_units; /* of those, cold: the first ones after the sink */
	struct kvp_block **blocks; /* [units][n_streams] */
};

static void hit_release(struct kvp_tenant_obj *t, struct prefix_hit *h)
{
	for (size_t i = 0; h->blocks && i < (size_t)h->units * h->n_streams; i++)
		kvp_block_put(t, h->blocks[i]);
	free(h->blocks);
	memset(h, 0, sizeof *h);
}

/* t's references to one entry's blocks: its own, or copies in t's arena of another tenant's. Under the
 * table lock, so the copies' charges must not relieve (relief takes the lock): KVP_ENOMEM instead. */
static int hit_take(struct kvp_tenant_obj *t, const struct prefix_entry *e, uint32_t dim, struct kvp_block **out)
{
	struct kvp_call no_relief = { .no_relief = 1 };
	for (uint32_t i = 0; i < e->n_streams; i++) {
		if (e->owner == t) {
			kvp_block_get(e->blocks[i]);
			out[i] = e->blocks[i];
		} else if (!(out[i] = kvp_block_copy(t, e->blocks[i], dim, &no_relief))) {
			while (i--)
				kvp_block_put(t, out[i]);
			return 0;
		}
	}
	return 1;
}

/* Unit u's entry for t: exact, else (while the run holds no exact block) a cold one t installed with
 * the codecs f names. Cold entries hold codes only t's own sequences read, so they are never copied. */
static struct prefix_entry *lookup_unit(const struct kvp_prefix_table *tab, const struct kvp_tenant_obj *t,
					const struct prefix_identity *id, const struct cold_form *f, uint64_t hash,
					const int32_t *unit, uint32_t n, int cold_ok)
{
	struct prefix_entry *e = find(tab, hash, id, unit, n, 0);
	return e || !cold_ok || !f->id ? e : find_cold(tab, hash, id, unit, n, t, f->id);
}

/* The longest run of units 0..n_units-1 the table holds, taken by t. */
static kvp_status lookup(struct kvp_tenant_obj *t, const struct prefix_identity *id, const struct cold_form *f,
			 const int32_t *tokens, const uint64_t *hashes, uint32_t n_units, struct prefix_hit *h)
{
	struct kvp_prefix_table *tab = t->pool->prefix;
	const struct kvp_tenant_config *c = &t->cfg;
	const uint32_t first_block = c->sinks ? 1 : 0;
	uint32_t exact_blocks = 0;
	h->n_streams = id->shape.n_layers * id->shape.n_kv_heads;
	if (!n_units)
		return KVP_OK;
	if (!(h->blocks = calloc((size_t)n_units * h->n_streams, sizeof *h->blocks)))
		return kvp_fail(KVP_ENOMEM, "kvp_seq_open_prefix: out of memory");
	pthread_mutex_lock(&tab->lock);
	for (uint32_t u = 0; u < n_units; u++) {
		const int32_t *unit = tokens + unit_start(c, u);
		struct prefix_entry *e = lookup_unit(tab, t, id, f, hashes[u], unit, unit_len(c, u),
						     u >= first_block && !exact_blocks);
		if (!e || !hit_take(t, e, id->shape.head_dim, h->blocks + (size_t)u * h->n_streams))
			break;
		if (e->cold)
			h->cold_units++;
		else
			exact_blocks += u >= first_block;
		e->last_use = ++tab->clock;
		h->units = u + 1;
	}
	pthread_mutex_unlock(&tab->lock);
	return KVP_OK;
}

/* The hit's blocks become the sequence's streams, as if it had appended tokens 0..n-1. */
static kvp_status install(struct kvp_seq_obj *s, struct prefix_hit *h, uint32_t n)
{
	struct kvp_tenant_obj *t = s->tenant;
	uint32_t sink_units = t->cfg.sinks && h->units ? 1 : 0, n_blocks = h->units - sink_units;
	for (uint32_t i = 0; i < h->n_streams; i++) {
		struct kvp_stream *st = &s->streams[i];
		if (n_blocks && !(st->blocks = kvp_alloc(t, n_blocks * sizeof *st->blocks, KVP_BYTES_META, NULL)))
			return KVP_ENOMEM;
		st->cap_blocks = st->n_blocks = n_blocks;
		for (uint32_t u = 0; u < h->units; u++) {
			struct kvp_block **b = &h->blocks[(size_t)u * h->n_streams + i];
			if (u < sink_units)
				st->sink = *b;
			else
				st->blocks[u - sink_units] = *b;
			*b = NULL; /* the stream's now */
		}
		st->n_tokens = n;
		/* cold blocks first, as appending would have made them; the context their codecs read */
		st->n_cold = h->cold_units;
		if (h->cold_units && kvp_cold_stream_ctx(t, s, st) != KVP_OK)
			return KVP_ENOMEM;
	}
	return KVP_OK;
}

kvp_status kvp_prefix_open_check(uint32_t n, const int32_t *tokens, const void *out, const uint32_t *n_cached)
{
	if (!out || !n_cached)
		return kvp_fail(KVP_EINVAL, "kvp_seq_open_prefix: out and n_cached must not be NULL");
	if (n == 0 || !tokens)
		return kvp_fail(KVP_EINVAL, "kvp_seq_open_prefix: a prompt of n >= 1 tokens is required (n=%u, "
				"tokens %s)", n, tokens ? "set" : "NULL");
	if (n > KVP_STREAM_TOKENS_MAX)
		return kvp_fail(KVP_EINVAL, "kvp_seq_open_prefix: n=%u tokens is more than a stream holds", n);
	return KVP_OK;
}

static uint32_t units_tokens(const struct kvp_tenant_config *c, uint32_t units)
{
	return units ? unit_start(c, units - 1) + unit_len(c, units - 1) : 0;
}

/* A cold unit serves only where a sequence that appended the run holds a cold block: outside the window
 * of the run's tokens. The run ends before the first one inside it; a shorter run has a later window
 * start, so this repeats until no cold unit is inside. */
static void hit_cut(struct kvp_tenant_obj *t, struct prefix_hit *h)
{
	const struct kvp_tenant_config *c = &t->cfg;
	uint32_t cold;
	while (h->cold_units > (cold = cold_blocks_within(c, units_tokens(c, h->units)))) {
		uint32_t units = (c->sinks ? 1 : 0) + cold;
		for (size_t i = (size_t)units * h->n_streams; i < (size_t)h->units * h->n_streams; i++) {
			kvp_block_put(t, h->blocks[i]);
			h->blocks[i] = NULL;
		}
		h->units = units;
		h->cold_units = cold;
	}
}

/* Local first; on a local miss with a remote tier, the rest of the chain from it, then local again. A
 * remote lookup that starts with the first block asks for the units that would be cold after `looked`
 * compressed (f); one that starts later asks exact: a stream's cold blocks come before its exact ones. */
static kvp_status lookup_tiers(struct kvp_tenant_obj *t, const struct prefix_identity *id, uint64_t idh,
			       const struct cold_form *f, const int32_t *tokens, const uint64_t *hashes,
			       uint32_t looked, struct prefix_hit *h, uint32_t *remote_units,
			       struct remote_outcome *remote)
{
	const struct kvp_tenant_config *c = &t->cfg;
	const uint32_t first_block = c->sinks ? 1 : 0;
	uint32_t local, cold_to = 0;
	kvp_status st = lookup(t, id, f, tokens, hashes, looked, h);
	*remote_units = 0;
	memset(remote, 0, sizeof *remote);
	if (st != KVP_OK)
		return st;
	local = h->units;
	if (t->pool->remote && local < looked) {
		if (f->id && local <= first_block)
			cold_to = first_block + cold_blocks_within(c, units_tokens(c, looked));
		prefix_fetch_remote(t, id, idh, f, tokens, hashes, local, looked, first_block, cold_to, remote);
		if (remote->installed) {
			hit_release(t, h);
			if ((st = lookup(t, id, f, tokens, hashes, looked, h)) != KVP_OK)
				return st;
		}
	}
	hit_cut(t, h);
	*remote_units = h->units > local ? h->units - local : 0;
	return KVP_OK;
}

static void count_lookup(struct kvp_tenant_obj *t, struct kvp_seq_obj *s, uint32_t looked, uint32_t n_cached,
			 uint32_t remote_tokens, const struct remote_outcome *remote)
{
	uint32_t missed = units_tokens(&t->cfg, looked) - n_cached;
	s->prefix_hit_tokens = n_cached;
	s->prefix_miss_tokens = missed;
	s->remote_hit_tokens = remote_tokens;
	s->remote_faults = remote->faults;
	s->remote_rejected = remote->rejected;
	atomic_fetch_add(&t->prefix_hit_tokens, n_cached);
	atomic_fetch_add(&t->prefix_miss_tokens, missed);
	atomic_fetch_add(&t->remote_hit_tokens, remote_tokens);
	atomic_fetch_add(&t->remote_faults, remote->faults);
	atomic_fetch_add(&t->remote_rejected, remote->rejected);
}

static kvp_status open_hit(struct kvp_tenant_obj *t, struct kvp_seq_obj *s, uint32_t n, const int32_t *tokens,
			   uint32_t *n_cached)
{
	const struct kvp_tenant_config *c = &t->cfg;
	uint32_t all = units_within(c, n), looked = units_within(c, n - 1), remote_units = 0, local_tokens;
	uint64_t *hashes = malloc(((size_t)all + 1) * sizeof *hashes), idh;
	struct prefix_identity id;
	struct prefix_hit h = { 0 };
	struct remote_outcome remote = { 0 };
	struct cold_form f;
	kvp_status st;
	if (!hashes)
		return kvp_fail(KVP_ENOMEM, "kvp_seq_open_prefix: out of memory");
	identity_of(t, &s->shape, &id);
	idh = identity_hash(&id, namespace_of(t));
	chain_hashes(t, idh, tokens, all, hashes);
	cold_form_of(s, idh, &f);
	/* the host computes at least the prompt's last token (it needs its logits): looked <= n - 1 tokens */
	st = lookup_tiers(t, &id, idh, &f, tokens, hashes, looked, &h, &remote_units, &remote);
	if (st == KVP_OK)
		st = prompt_prepare(s, &id, tokens, all, h.units, hashes);
	*n_cached = units_tokens(c, h.units);
	local_tokens = units_tokens(c, h.units - remote_units);
	if (st == KVP_OK && (st = install(s, &h, *n_cached)) != KVP_OK) {
		/* what the tenant has not counted yet goes back before the sequence is destroyed */
		for (uint32_t i = 0; i < h.n_streams; i++)
			kvp_stream_release(t, &s->streams[i]);
	}
	hit_release(t, &h);
	if (st == KVP_OK) {
		count_lookup(t, s, looked, *n_cached, *n_cached - local_tokens, &remote);
		if (remote.note[0]) /* a miss, not a failure: the host hears of it as a note */
			kvp_fail(KVP_OK, "kvp_seq_open_prefix: remote tier: %s", remote.note);
	}
	free(hashes);
	return st;
}

/* Fills a new sequence, not linked yet (no pressure can reach it meanwhile), from the cache. */
kvp_status kvp_prefix_seq_fill(struct kvp_tenant_obj *t, struct kvp_seq_obj *s, uint32_t n, const int32_t *tokens,
			       uint32_t *n_cached)
{
	uint64_t streams, held;
	kvp_status st = open_hit(t, s, n, tokens, n_cached);
	if (st != KVP_OK) {
		*n_cached = 0;
		return st;
	}
	streams = (uint64_t)s->shape.n_layers * s->shape.n_kv_heads;
	held = streams * *n_cached;
	/* the installed tokens count as appended: the sequence is what appending them would have made */
	s->tokens_appended = held;
	s->t0 = *n_cached;
	atomic_fetch_add(&t->tokens_appended, held);
	atomic_fetch_add(&t->tokens_retained, held);
	atomic_fetch_add(&t->bytes_dense_fp16, held * s->shape.head_dim * 4);
	return KVP_OK;
}
