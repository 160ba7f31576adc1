/*
 * tools/llama.c — llama2.c checkpoints, their tokenizer, and the forward pass (see llama.h).
 *
 * Behaviour follows karpathy/llama2.c run.c (the format's definition); the code is written here.
 */
#include "tools/llama.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LLAMA_HEADER_INTS 7
#define LLAMA_ROPE_THETA 10000.0f
#define LLAMA_RMS_EPS 1e-5f

static int fail(char err[LLAMA_ERROR_MAX], int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(char err[LLAMA_ERROR_MAX], int status, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return status;
	va_start(ap, fmt);
	vsnprintf(err, LLAMA_ERROR_MAX, fmt, ap);
	va_end(ap);
	return status;
}

/* ---- checkpoint ---- */

/* a * b, or 0 with *overflow set: header values are untrusted and their products can exceed 64 bits */
static uint64_t mul_checked(uint64_t a, uint64_t b, int *overflow)
{
	if (a && b > UINT64_MAX / a) {
		*overflow = 1;
		return 0;
	}
	return a * b;
}

static uint64_t add_checked(uint64_t a, uint64_t b, int *overflow)
{
	if (b > UINT64_MAX - a) {
		*overflow = 1;
		return 0;
	}
	return a + b;
}

static int config_from_header(struct llama_config *c, const int32_t h[LLAMA_HEADER_INTS], const char *path,
			      char err[LLAMA_ERROR_MAX])
{
	memset(c, 0, sizeof(*c));
	c->dim = h[0];
	c->hidden_dim = h[1];
	c->n_layers = h[2];
	c->n_heads = h[3];
	c->n_kv_heads = h[4];
	c->vocab_size = h[5] < 0 ? (h[5] == INT32_MIN ? 0 : -h[5]) : h[5];
	c->shared_classifier = h[5] > 0;
	c->seq_len = h[6];
	if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
	    c->vocab_size <= 0 || c->seq_len <= 0)
		return fail(err, LLAMA_EINPUT,
			    "%s: not a llama2.c checkpoint: header (dim %d, hidden_dim %d, n_layers %d, "
			    "n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d) has a value that is "
			    "not positive",
			    path, h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
	if (c->dim % c->n_heads)
		return fail(err, LLAMA_EINPUT, "%s: dim %d is not a multiple of n_heads %d", path, c->dim,
			    c->n_heads);
	if (c->n_heads % c->n_kv_heads)
		return fail(err, LLAMA_EINPUT, "%s: n_heads %d is not a multiple of n_kv_heads %d", path,
			    c->n_heads, c->n_kv_heads);
	c->head_size = c->dim / c->n_heads;
	c->kv_dim = c->n_kv_heads * c->head_size;
	if (c->head_size % 2)
		return fail(err, LLAMA_EINPUT, "%s: head size %d is odd; RoPE rotates pairs", path,
			    c->head_size);
	return LLAMA_OK;
}

/* Number of floats after the header, or 0 when it does not fit in 64 bits. */
static uint64_t checkpoint_floats(const struct llama_config *c)
{
	uint64_t layers = (uint64_t)c->n_layers, dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
	uint64_t kv = (uint64_t)c->kv_dim, vocab = (uint64_t)c->vocab_size, n = 0;
	int o = 0;

	n = add_checked(n, mul_checked(vocab, dim, &o), &o);                                /* embedding */
	n = add_checked(n, mul_checked(layers, 2 * dim, &o), &o);                           /* rms att, ffn */
	n = add_checked(n, mul_checked(layers, mul_checked(dim, 2 * dim, &o), &o), &o);     /* wq, wo */
	n = add_checked(n, mul_checked(layers, mul_checked(kv, 2 * dim, &o), &o), &o);      /* wk, wv */
	n = add_checked(n, mul_checked(layers, mul_checked(hidden, 3 * dim, &o), &o), &o);  /* w1, w2, w3 */
	n = add_checked(n, dim, &o);                                                        /* final norm */
	n = add_checked(n, mul_checked((uint64_t)c->seq_len, (uint64_t)c->head_size, &o), &o); /* freq_cis */
	if (!c->shared_classifier)
		n = add_checked(n, mul_checked(vocab, dim, &o), &o);
	if (o || n > (UINT64_MAX - 4 * LLAMA_HEADER_INTS) / 4 || n > SIZE_MAX / sizeof(float))
		return 0;
	return n;
}

/* Lays the tensor views over m->data in file order. */
static void map_tensors(struct llama_model *m)
{
	const struct llama_config *c = &m->config;
	size_t layers = (size_t)c->n_layers, dim = (size_t)c->dim, hidden = (size_t)c->hidden_dim;
	size_t kv = (size_t)c->kv_dim;
	const float *p = m->data;

	m->token_embedding = p;
	p += (size_t)c->vocab_size * dim;
	m->rms_att = p;
	p += layers * dim;
	m->wq = p;
	p += layers * dim * dim;
	m->wk = p;
	p += layers * kv * dim;
	m->wv = p;
	p += layers * kv * dim;
	m->wo = p;
	p += layers * dim * dim;
	m->rms_ffn = p;
	p += layers * dim;
	m->w1 = p;
	p += layers * hidden * dim;
	m->w2 = p;
	p += layers * dim * hidden;
	m->w3 = p;
	p += layers * hidden * dim;
	m->rms_final = p;
	p += dim;
	p += (size_t)c->seq_len * (size_t)c->head_size; /* freq_cis_real, freq_cis_imag: unused */
	m->wcls = c->shared_classifier ? m->token_embedding : p;
}

static int file_size(FILE *f, uint64_t *size)
{
	off_t end;

	if (fseeko(f, 0, SEEK_END) != 0)
		return -1;
	end = ftello(f);
	if (end < 0 || fseeko(f, 0, SEEK_SET) != 0)
		return -1;
	*size = (uint64_t)end;
	return 0;
}

static int read_header(FILE *f, const char *path, struct llama_config *c, uint64_t *n_floats,
		       char err[LLAMA_ERROR_MAX])
{
	int32_t h[LLAMA_HEADER_INTS];
	uint64_t size, expect;
	int rc;

	if (file_size(f, &size) != 0)
		return fail(err, LLAMA_EINPUT, "%s: cannot determine the file size: %s", path,
			    strerror(errno));
	if (size < sizeof(h))
		return fail(err, LLAMA_EINPUT, "%s: too short for a llama2.c checkpoint: %llu bytes, "
			    "the header alone is %zu", path, (unsigned long long)size, sizeof(h));
	if (fread(h, sizeof(h), 1, f) != 1)
		return fail(err, LLAMA_EINPUT, "%s: cannot read the header", path);
	rc = config_from_header(c, h, path, err);
	if (rc)
		return rc;
	*n_floats = checkpoint_floats(c);
	if (!*n_floats)
		return fail(err, LLAMA_EINPUT, "%s: header values are too large to describe a real file",
			    path);
	expect = sizeof(h) + 4 * *n_floats;
	if (size != expect)
		return fail(err, LLAMA_EINPUT, "%s: %s: %llu bytes, but the header (dim %d, hidden_dim %d, "
			    "n_layers %d, n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d) implies %llu",
			    path, size < expect ? "truncated" : "has trailing bytes",
			    (unsigned long long)size, h[0], h[1], h[2], h[3], h[4], h[5], h[6],
			    (unsigned long long)expect);
	return LLAMA_OK;
}

int llama_model_load(struct llama_model *m, const char *path, char err[LLAMA_ERROR_MAX])
{
	uint64_t n_floats = 0;
	FILE *f;
	int rc;

	memset(m, 0, sizeof(*m));
	f = fopen(path, "rb");
	if (!f)
		return fail(err, LLAMA_EINPUT, "%s: cannot open the checkpoint: %s", path, strerror(errno));
	rc = read_header(f, path, &m->config, &n_floats, err);
	if (rc)
		goto out;
	m->n_floats = (size_t)n_floats;
	m->data = malloc(m->n_floats * sizeof(float));
	if (!m->data) {
		rc = fail(err, LLAMA_ENOMEM, "%s: no memory for %zu weights", path, m->n_floats);
		goto out;
	}
	if (fread(m->data, sizeof(float), m->n_floats, f) != m->n_floats) {
		rc = fail(err, LLAMA_EINPUT, "%s: read error in the weights", path);
		goto out;
	}
	map_tensors(m);
out:
	fclose(f);
	if (rc) {
		free(m->data);
		memset(m, 0, sizeof(*m));
	}
	return rc;
}

void llama_model_free(struct llama_model *m)
{
	free(m->data);
	memset(m, 0, sizeof(*m));
}

kvp_shape llama_model_shape(const struct llama_config *c)
{
	kvp_shape s = {
		.n_layers = (uint32_t)c->n_layers,
		.n_heads = (uint32_t)c->n_heads,
		.n_kv_heads = (uint32_t)c->n_kv_heads,
		.head_dim = (uint32_t)c->head_size,
		.rope_theta = LLAMA_ROPE_THETA,
		.rope_layout = KVP_ROPE_INTERLEAVED, /* llama2.c rotates adjacent pairs */
	};
	return s;
}

/* ---- tokenizer ---- */

static int piece_order(const void *a, const void *b)
{
	const struct llama_piece_index *x = a, *y = b;
	uint32_t n = x->length < y->length ? x->length : y->length;
	int c = memcmp(x->text, y->text, n);

	if (c)
		return c;
	return (x->length > y->length) - (x->length < y->length);
}

static int read_piece(struct llama_tokenizer *t, FILE *f, int id, const char *path, char err[LLAMA_ERROR_MAX])
{
	int32_t len;

	if (fread(&t->scores[id], sizeof(float), 1, f) != 1 || fread(&len, sizeof(len), 1, f) != 1)
		return fail(err, LLAMA_EINPUT, "%s: truncated: record %d of %d is missing", path, id,
			    t->vocab_size);
	if (len < 0 || len > t->max_token_length)
		return fail(err, LLAMA_EINPUT, "%s: record %d has length %d, outside 0..max_token_length %d",
			    path, id, (int)len, t->max_token_length);
	t->pieces[id] = malloc((size_t)len + 1);
	if (!t->pieces[id])
		return fail(err, LLAMA_ENOMEM, "%s: no memory for the vocabulary", path);
	if (len && fread(t->pieces[id], (size_t)len, 1, f) != 1)
		return fail(err, LLAMA_EINPUT, "%s: truncated: record %d ends early", path, id);
	t->pieces[id][len] = '\0';
	if (memchr(t->pieces[id], '\0', (size_t)len))
		return fail(err, LLAMA_EINPUT, "%s: record %d contains a NUL byte", path, id);
	t->lengths[id] = (uint32_t)len;
	return LLAMA_OK;
}

static int read_vocabulary(struct llama_tokenizer *t, FILE *f, const char *path, char err[LLAMA_ERROR_MAX])
{
	int32_t max_len;
	int i, rc;

	if (fread(&max_len, sizeof(max_len), 1, f) != 1)
		return fail(err, LLAMA_EINPUT, "%s: too short for a tokenizer: no max_token_length", path);
	if (max_len <= 0 || max_len > 65536)
		return fail(err, LLAMA_EINPUT, "%s: not a tokenizer: max_token_length %d", path,
			    (int)max_len);
	t->max_token_length = max_len;
	for (i = 0; i < t->vocab_size; i++) {
		rc = read_piece(t, f, i, path, err);
		if (rc)
			return rc;
	}
	/* A longer vocabulary is the wrong tokenizer for this model (tokenizer.bin with a 512 model). */
	if (fgetc(f) != EOF)
		return fail(err, LLAMA_EINPUT,
			    "%s: has more than the model's %d tokens: the wrong tokenizer?", path,
			    t->vocab_size);
	return LLAMA_OK;
}

static int tokenizer_alloc(struct llama_tokenizer *t, int vocab_size)
{
	size_t n = (size_t)vocab_size;

	t->vocab_size = vocab_size;
	t->pieces = calloc(n, sizeof(*t->pieces));
	t->lengths = calloc(n, sizeof(*t->lengths));
	t->scores = calloc(n, sizeof(*t->scores));
	t->index = calloc(n, sizeof(*t->index));
	return t->pieces && t->lengths && t->scores && t->index ? 0 : -1;
}

int llama_tokenizer_load(struct llama_tokenizer *t, const char *path, int vocab_size,
			 char err[LLAMA_ERROR_MAX])
{
	FILE *f;
	int i, rc;

	memset(t, 0, sizeof(*t));
	if (vocab_size <= 0)
		return fail(err, LLAMA_EINPUT, "%s: vocab_size %d is not positive", path, vocab_size);
	f = fopen(path, "rb");
	if (!f)
		return fail(err, LLAMA_EINPUT, "%s: cannot open the tokenizer: %s", path, strerror(errno));
	if (tokenizer_alloc(t, vocab_size))
		rc = fail(err, LLAMA_ENOMEM, "%s: no memory for %d tokens", path, vocab_size);
	else
		rc = read_vocabulary(t, f, path, err);
	fclose(f);
	if (rc) {
		llama_tokenizer_free(t);
		return rc;
	}
	for (i = 0; i < vocab_size; i++)
		t->index[i] = (struct llama_piece_index){ t->pieces[i], t->lengths[i], i };
	qsort(t->index, (size_t)vocab_size, sizeof(*t->index), piece_order);
	for (i = 0; i < 256; i++)
		t->bytes[i] = (unsigned char)i;
	return LLAMA_OK;
}

void llama_tokenizer_free(struct llama_tokenizer *t)
{
	int i;

	if (t->pieces)
		for (i = 0; i < t->vocab_size; i++)
			free(t->pieces[i]);
	free(t->pieces);
	free(t->lengths);
	free(t->scores);
	free(t->index);
	memset(t, 0, sizeof(*t));
}

int llama_tokenizer_find(const struct llama_tokenizer *t, const char *piece, size_t len)
{
	struct llama_piece_index key = { piece, (uint32_t)len, -1 };
	const struct llama_piece_index *hit;

	if (len > (size_t)t->max_token_length)
		return -1;
	hit = bsearch(&key, t->index, (size_t)t->vocab_size, sizeof(*t->index), piece_order);
	return hit ? hit->id : -1;
}

/* Length of the UTF-8 character starting at s: the lead byte and up to 3 continuation bytes. */
static size_t utf8_char_length(const unsigned char *s)
{
	size_t n = 1;

	while (n < 4 && (s[n] & 0xC0) == 0x80)
		n++;
	return n;
}

/* Appends the ids of the characters of text, falling back to one id per byte. */
static int encode_characters(const struct llama_tokenizer *t, const char *text, int *ids, int n)
{
	const unsigned char *s = (const unsigned char *)text;
	size_t len, i;
	int id;

	while (*s) {
		len = utf8_char_length(s);
		id = llama_tokenizer_find(t, (const char *)s, len);
		if (id >= 0)
			ids[n++] = id;
		else
			for (i = 0; i < len; i++)
				ids[n++] = s[i] + LLAMA_TOKEN_BYTE0;
		s += len;
	}
	return n;
}

/* The id of pieces[a] followed by pieces[b], or -1; buf holds 2 * max_token_length bytes. */
static int pair_id(const struct llama_tokenizer *t, int a, int b, char *buf)
{
	memcpy(buf, t->pieces[a], t->lengths[a]);
	memcpy(buf + t->lengths[a], t->pieces[b], t->lengths[b]);
	return llama_tokenizer_find(t, buf, (size_t)t->lengths[a] + t->lengths[b]);
}

/*
 * Greedy BPE: merge the adjacent pair whose joined piece has the best score, leftmost on ties, until no
 * pair joins. The ids form a linked list (a merge unlinks the right one) and the candidate pairs a heap
 * ordered by (score, position); a candidate whose ids changed since it was pushed is skipped when it
 * surfaces. That makes the same merges in the same order as rescanning every pair after each merge,
 * in O(n log n): a whole file of 100K characters takes milliseconds, not a quarter of a minute.
 */
struct merge_candidate {
	float score;
	int left, right; /* positions in the list */
	int joined;      /* the id of the joined piece */
	int left_id, right_id;
};

struct merge_list {
	int *id, *prev, *next; /* [n]; a merged-away position has id -1 */
	struct merge_candidate *heap;
	int n_heap;
	char *buf; /* 2 * max_token_length bytes for pair_id */
};

/* a surfaces before b: a better score, or the same score further left */
static int candidate_first(const struct merge_candidate *a, const struct merge_candidate *b)
{
	return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_swap(struct merge_candidate *h, int i, int j)
{
	struct merge_candidate x = h[i];

	h[i] = h[j];
	h[j] = x;
}

static void heap_push(struct merge_list *l, const struct merge_candidate *c)
{
	int i = l->n_heap++;

	l->heap[i] = *c;
	for (; i > 0 && candidate_first(&l->heap[i], &l->heap[(i - 1) / 2]); i = (i - 1) / 2)
		heap_swap(l->heap, i, (i - 1) / 2);
}

static struct merge_candidate heap_pop(struct merge_list *l)
{
	struct merge_candidate top = l->heap[0];
	int i = 0, child;

	l->heap[0] = l->heap[--l->n_heap];
	for (;;) {
		child = 2 * i + 1;
		if (child >= l->n_heap)
			break;
		if (child + 1 < l->n_heap && candidate_first(&l->heap[child + 1], &l->heap[child]))
			child++;
		if (!candidate_first(&l->heap[child], &l->heap[i]))
			break;
		heap_swap(l->heap, i, child);
		i = child;
	}
	return top;
}

/* Pushes the pair starting at position left, when there is one and it joins. */
static void push_pair(const struct llama_tokenizer *t, struct merge_list *l, int left)
{
	struct merge_candidate c;

	if (left < 0 || l->next[left] < 0)
		return;
	c.left = left;
	c.right = l->next[left];
	c.left_id = l->id[left];
	c.right_id = l->id[c.right];
	c.joined = pair_id(t, c.left_id, c.right_id, l->buf);
	if (c.joined < 0)
		return;
	c.score = t->scores[c.joined];
	heap_push(l, &c);
}

/* The candidate still names two neighbours holding the ids it was made from. */
static int candidate_current(const struct merge_list *l, const struct merge_candidate *c)
{
	return l->id[c->left] == c->left_id && l->next[c->left] == c->right && l->id[c->right] == c->right_id;
}

static void merge_list_free(struct merge_list *l)
{
	free(l->id);
	free(l->prev);
	free(l->next);
	free(l->heap);
	free(l->buf);
}

static int merge_list_init(const struct llama_tokenizer *t, struct merge_list *l, const int *ids, int n)
{
	size_t cap = (size_t)(n > 0 ? n : 1);
	int i;

	memset(l, 0, sizeof(*l));
	l->id = malloc(sizeof(int) * cap);
	l->prev = malloc(sizeof(int) * cap);
	l->next = malloc(sizeof(int) * cap);
	l->heap = malloc(sizeof(*l->heap) * 3 * cap); /* n - 1 pairs, then at most 2 per merge */
	l->buf = malloc(2 * (size_t)t->max_token_length + 1);
	if (!l->id || !l->prev || !l->next || !l->heap || !l->buf) {
		merge_list_free(l);
		return -1;
	}
	for (i = 0; i < n; i++) {
		l->id[i] = ids[i];
		l->prev[i] = i - 1;
		l->next[i] = i + 1 < n ? i + 1 : -1;
	}
	for (i = 0; i + 1 < n; i++)
		push_pair(t, l, i);
	return 0;
}

static int merge_pairs(const struct llama_tokenizer *t, int *ids, int n)
{
	struct merge_list l;
	struct merge_candidate c;
	int i, out = 0;

	if (merge_list_init(t, &l, ids, n))
		return -1;
	while (l.n_heap > 0) {
		c = heap_pop(&l);
		if (!candidate_current(&l, &c))
			continue;
		l.id[c.left] = c.joined;
		l.id[c.right] = -1;
		l.next[c.left] = l.next[c.right];
		if (l.next[c.left] >= 0)
			l.prev[l.next[c.left]] = c.left;
		push_pair(t, &l, l.prev[c.left]);
		push_pair(t, &l, c.left);
	}
	for (i = n > 0 ? 0 : -1; i >= 0; i = l.next[i])
		ids[out++] = l.id[i];
	merge_list_free(&l);
	return out;
}

int llama_encode(const struct llama_tokenizer *t, const char *text, int bos, int eos, int *ids)
{
	int n = 0, space;

	if (bos)
		ids[n++] = LLAMA_TOKEN_BOS;
	if (text[0]) {
		/* SentencePiece's dummy prefix: every text starts a word */
		space = llama_tokenizer_find(t, " ", 1);
		ids[n++] = space >= 0 ? space : ' ' + LLAMA_TOKEN_BYTE0;
	}
	n = encode_characters(t, text, ids, n);
	n = merge_pairs(t, ids, n);
	if (n < 0)
		return -1;
	if (eos)
		ids[n++] = LLAMA_TOKEN_EOS;
	return n;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

const char *llama_decode(const struct llama_tokenizer *t, int prev, int id, size_t *len)
{
	const char *p;
	int hi, lo;

	if (id < 0 || id >= t->vocab_size) {
		*len = 0;
		return "";
	}
	p = t->pieces[id];
	*len = t->lengths[id];
	if (prev == LLAMA_TOKEN_BOS && p[0] == ' ') {
		p++;
		(*len)--;
	}
	if (*len == 6 && !memcmp(p, "<0x", 3) && p[5] == '>') {
		hi = hex_digit(p[3]);
		lo = hex_digit(p[4]);
		if (hi >= 0 && lo >= 0) {
			*len = 1;
			return (const char *)&t->bytes[hi * 16 + lo];
		}
	}
	return p;
}

/* ---- forward pass ---- */

int llama_state_init(struct llama_state *s, const struct llama_config *c)
{
	size_t dim = (size_t)c->dim, hidden = (size_t)c->hidden_dim, kv = (size_t)c->kv_dim;

	memset(s, 0, sizeof(*s));
	s->x = calloc(dim, sizeof(float));
	s->xb = calloc(dim, sizeof(float));
	s->xb2 = calloc(dim, sizeof(float));
	s->hb = calloc(hidden, sizeof(float));
	s->hb2 = calloc(hidden, sizeof(float));
	s->q = calloc(dim, sizeof(float));
	s->q_pre_rope = calloc(dim, sizeof(float));
	s->k = calloc(kv, sizeof(float));
	s->v = calloc(kv, sizeof(float));
	s->att_out = calloc(dim, sizeof(float));
	s->logits = calloc((size_t)c->vocab_size, sizeof(float));
	if (s->x && s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->q_pre_rope && s->k && s->v &&
	    s->att_out && s->logits)
		return LLAMA_OK;
	llama_state_free(s);
	return LLAMA_ENOMEM;
}

void llama_state_free(struct llama_state *s)
{
	free(s->x);
	free(s->xb);
	free(s->xb2);
	free(s->hb);
	free(s->hb2);
	free(s->q);
	free(s->q_pre_rope);
	free(s->k);
	free(s->v);
	free(s->att_out);
	free(s->logits);
	memset(s, 0, sizeof(*s));
}

static void rmsnorm(float *out, const float *x, const float *w, int n)
{
	float ss = 0.0f;
	int i;

	for (i = 0; i < n; i++)
		ss += x[i] * x[i];
	ss = 1.0f / sqrtf(ss / (float)n + LLAMA_RMS_EPS);
	for (i = 0; i < n; i++)
		out[i] = w[i] * (ss * x[i]);
}

float llama_dot(const float *a, const float *b, int n)
{
	float lane[8] = { 0 }, sum = 0.0f;
	int j, i;

	for (j = 0; j + 8 <= n; j += 8)
		for (i = 0; i < 8; i++)
			lane[i] += a[j + i] * b[j + i];
	for (; j < n; j++)
		sum += a[j] * b[j];
	for (i = 0; i < 8; i++)
		sum += lane[i];
	return sum;
}

/* out[r] = sum_j w[r][j] x[j], w: [rows][cols] as nn.Linear stores it */
static void matmul(float *out, const float *x, const float *w, int cols, int rows)
{
	int r;

	for (r = 0; r < rows; r++)
		out[r] = llama_dot(w + (size_t)r * (size_t)cols, x, cols);
}

/* Rotates adjacent pairs (2m, 2m+1) of every head of x[0..n) by pos * theta^(-2m/head_size). */
static void rope(float *x, int n, int head_size, int pos)
{
	int i;

	for (i = 0; i < n; i += 2) {
		float freq = 1.0f / powf(LLAMA_ROPE_THETA, (float)(i % head_size) / (float)head_size);
		float angle = (float)pos * freq, c = cosf(angle), s = sinf(angle);
		float a = x[i], b = x[i + 1];

		x[i] = a * c - b * s;
		x[i + 1] = a * s + b * c;
	}
}

static void swiglu(float *h, const float *up, int n)
{
	int i;

	for (i = 0; i < n; i++)
		h[i] = h[i] / (1.0f + expf(-h[i])) * up[i];
}

static void add(float *x, const float *y, int n)
{
	int i;

	for (i = 0; i < n; i++)
		x[i] += y[i];
}

static void observe(const struct llama_observer *o, enum llama_tap tap, int layer, int pos, const float *x,
		    int n)
{
	if (o && o->observe)
		o->observe(o->ctx, tap, layer, pos, x, n);
}

/* Attention block of one layer: x += wo * attention(rope(wq xn), rope(wk xn), wv xn) */
static int attention_block(const struct llama_model *m, struct llama_state *s,
			   const struct llama_attention *att, const struct llama_observer *o, int l, int pos)
{
	const struct llama_config *c = &m->config;
	size_t dd = (size_t)c->dim * (size_t)c->dim, kd = (size_t)c->kv_dim * (size_t)c->dim;

	rmsnorm(s->xb, s->x, m->rms_att + (size_t)l * (size_t)c->dim, c->dim);
	matmul(s->q, s->xb, m->wq + (size_t)l * dd, c->dim, c->dim);
	matmul(s->k, s->xb, m->wk + (size_t)l * kd, c->dim, c->kv_dim);
	matmul(s->v, s->xb, m->wv + (size_t)l * kd, c->dim, c->kv_dim);
	memcpy(s->q_pre_rope, s->q, sizeof(float) * (size_t)c->dim);
	observe(o, LLAMA_TAP_Q_PRE_ROPE, l, pos, s->q, c->dim);
	observe(o, LLAMA_TAP_K_PRE_ROPE, l, pos, s->k, c->kv_dim);
	rope(s->q, c->dim, c->head_size, pos);
	rope(s->k, c->kv_dim, c->head_size, pos);
	observe(o, LLAMA_TAP_Q, l, pos, s->q, c->dim);
	observe(o, LLAMA_TAP_K, l, pos, s->k, c->kv_dim);
	observe(o, LLAMA_TAP_V, l, pos, s->v, c->kv_dim);
	if (att->append(att->ctx, l, pos, s->k, s->v) || att->attend(att->ctx, l, pos, s->q, s->att_out))
		return LLAMA_EATTENTION;
	observe(o, LLAMA_TAP_ATTENTION, l, pos, s->att_out, c->dim);
	matmul(s->xb2, s->att_out, m->wo + (size_t)l * dd, c->dim, c->dim);
	add(s->x, s->xb2, c->dim);
	return LLAMA_OK;
}

/* Feed-forward block of one layer: x += w2 (silu(w1 xn) * w3 xn) */
static void ffn_block(const struct llama_model *m, struct llama_state *s, int l)
{
	const struct llama_config *c = &m->config;
	size_t hd = (size_t)c->hidden_dim * (size_t)c->dim;

	rmsnorm(s->xb, s->x, m->rms_ffn + (size_t)l * (size_t)c->dim, c->dim);
	matmul(s->hb, s->xb, m->w1 + (size_t)l * hd, c->dim, c->hidden_dim);
	matmul(s->hb2, s->xb, m->w3 + (size_t)l * hd, c->dim, c->hidden_dim);
	swiglu(s->hb, s->hb2, c->hidden_dim);
	matmul(s->xb, s->hb, m->w2 + (size_t)l * hd, c->hidden_dim, c->dim);
	add(s->x, s->xb, c->dim);
}

int llama_forward(const struct llama_model *m, struct llama_state *s, const struct llama_attention *att,
		  const struct llama_observer *observer, int token, int pos)
{
	const struct llama_config *c = &m->config;
	int l, rc;

	if (token < 0 || token >= c->vocab_size || pos < 0 || pos >= c->seq_len)
		return LLAMA_EINPUT;
	memcpy(s->x, m->token_embedding + (size_t)token * (size_t)c->dim, sizeof(float) * (size_t)c->dim);
	for (l = 0; l < c->n_layers; l++) {
		rc = attention_block(m, s, att, observer, l, pos);
		if (rc)
			return rc;
		ffn_block(m, s, l);
	}
	rmsnorm(s->x, s->x, m->rms_final, c->dim);
	matmul(s->logits, s->x, m->wcls, c->dim, c->vocab_size);
	if (att->step && att->step(att->ctx))
		return LLAMA_EATTENTION;
	return LLAMA_OK;
}

/* ---- the exact dense cache ---- */

int llama_dense_cache_init(struct llama_dense_cache *c, const struct llama_config *config)
{
	size_t n = (size_t)config->n_layers * (size_t)config->seq_len * (size_t)config->kv_dim;

	memset(c, 0, sizeof(*c));
	c->config = *config;
	c->keys = malloc(n * sizeof(float));
	c->values = malloc(n * sizeof(float));
	c->scores = malloc((size_t)config->seq_len * sizeof(float));
	c->length = calloc((size_t)config->n_layers, sizeof(int));
	if (c->keys && c->values && c->scores && c->length)
		return LLAMA_OK;
	llama_dense_cache_free(c);
	return LLAMA_ENOMEM;
}

void llama_dense_cache_free(struct llama_dense_cache *c)
{
	free(c->keys);
	free(c->values);
	free(c->scores);
	free(c->length);
	memset(c, 0, sizeof(*c));
}

static size_t dense_offset(const struct llama_dense_cache *c, int layer, int pos)
{
	return ((size_t)layer * (size_t)c->config.seq_len + (size_t)pos) * (size_t)c->config.kv_dim;
}

/* Positions are written in order; writing an earlier one rewinds the layer to it. */
static int dense_append(void *ctx, int layer, int pos, const float *k, const float *v)
{
	struct llama_dense_cache *c = ctx;
	size_t kv = (size_t)c->config.kv_dim;

	if (layer < 0 || layer >= c->config.n_layers || pos < 0 || pos >= c->config.seq_len ||
	    pos > c->length[layer])
		return -1;
	memcpy(c->keys + dense_offset(c, layer, pos), k, kv * sizeof(float));
	memcpy(c->values + dense_offset(c, layer, pos), v, kv * sizeof(float));
	c->length[layer] = pos + 1;
	return 0;
}

static void softmax(float *x, int n)
{
	float max = x[0], sum = 0.0f;
	int i;

	for (i = 1; i < n; i++)
		if (x[i] > max)
			max = x[i];
	for (i = 0; i < n; i++) {
		x[i] = expf(x[i] - max);
		sum += x[i];
	}
	for (i = 0; i < n; i++)
		x[i] /= sum;
}

/* One query head over kv head g of a layer. */
static void dense_attend_head(struct llama_dense_cache *c, int layer, int g, const float *q, float *out)
{
	int hs = c->config.head_size, n = c->length[layer], t, i;
	float scale = 1.0f / sqrtf((float)hs);

	for (t = 0; t < n; t++) {
		const float *k = c->keys + dense_offset(c, layer, t) + (size_t)g * (size_t)hs;

		c->scores[t] = llama_dot(q, k, hs) * scale;
	}
	memset(out, 0, sizeof(float) * (size_t)hs);
	if (!n)
		return;
	softmax(c->scores, n);
	for (t = 0; t < n; t++) {
		const float *v = c->values + dense_offset(c, layer, t) + (size_t)g * (size_t)hs;

		for (i = 0; i < hs; i++)
			out[i] += c->scores[t] * v[i];
	}
}

static int dense_attend(void *ctx, int layer, int pos, const float *q, float *out)
{
	struct llama_dense_cache *c = ctx;
	int h, group = c->config.n_heads / c->config.n_kv_heads;
	size_t hs = (size_t)c->config.head_size;

	(void)pos; /* the cache knows how many positions it holds */
	if (layer < 0 || layer >= c->config.n_layers)
		return -1;
	for (h = 0; h < c->config.n_heads; h++)
		dense_attend_head(c, layer, h / group, q + (size_t)h * hs, out + (size_t)h * hs);
	return 0;
}

struct llama_attention llama_dense_attention(struct llama_dense_cache *c)
{
	struct llama_attention a = { .ctx = c, .append = dense_append, .attend = dense_attend, .step = NULL };
	return a;
}

/* ---- attention through the kvpager plugin table ---- */

static int plugin_failed(struct llama_plugin_cache *c, kvp_status st, const char *what)
{
	const char *detail = c->api->last_error ? c->api->last_error() : "";

	c->status = st;
	snprintf(c->message, sizeof(c->message), "%s: %s%s%s", what, c->api->strerror(st),
		 detail && detail[0] ? ": " : "", detail ? detail : "");
	return st == KVP_EINVAL ? LLAMA_EINPUT : LLAMA_EATTENTION;
}

int llama_plugin_cache_open(struct llama_plugin_cache *c, const kvp_plugin_v1 *api,
			    const struct llama_config *config, const char *pool_spec, const char *cache_spec)
{
	kvp_shape shape = llama_model_shape(config);
	kvp_status st;
	int rc;

	memset(c, 0, sizeof(*c));
	c->api = api;
	c->n_kv_heads = config->n_kv_heads;
	c->head_size = config->head_size;
	st = api->pool_open(pool_spec ? pool_spec : "", &c->pool);
	if (st)
		return plugin_failed(c, st, "pool");
	st = api->tenant_open(c->pool, "llama", cache_spec ? cache_spec : "", &c->tenant);
	if (st) {
		rc = plugin_failed(c, st, "cache");
		goto fail;
	}
	st = api->seq_open(c->tenant, &shape, &c->seq);
	if (st) {
		rc = plugin_failed(c, st, "sequence");
		goto fail;
	}
	return LLAMA_OK;
fail:
	llama_plugin_cache_close(c);
	return rc;
}

void llama_plugin_cache_close(struct llama_plugin_cache *c)
{
	if (!c->api)
		return;
	if (c->seq)
		c->api->seq_close(c->seq);
	if (c->tenant)
		c->api->tenant_close(c->tenant);
	if (c->pool)
		c->api->pool_close(c->pool);
	c->seq = NULL;
	c->tenant = NULL;
	c->pool = NULL;
}

static int plugin_append(void *ctx, int layer, int pos, const float *k, const float *v)
{
	struct llama_plugin_cache *c = ctx;
	int32_t p = pos;
	kvp_status st = c->api->append(c->seq, (uint32_t)layer, 1, &p, k, v);

	return st ? plugin_failed(c, st, "append") : 0;
}

static int plugin_attend(void *ctx, int layer, int pos, const float *q, float *out)
{
	struct llama_plugin_cache *c = ctx;
	kvp_status st = c->api->attend(c->seq, (uint32_t)layer, q, out);

	(void)pos;
	return st ? plugin_failed(c, st, "attend") : 0;
}

static int plugin_step(void *ctx)
{
	struct llama_plugin_cache *c = ctx;
	kvp_status st = c->api->seq_step(c->seq);

	return st ? plugin_failed(c, st, "step") : 0;
}

struct llama_attention llama_plugin_attention(struct llama_plugin_cache *c)
{
	struct llama_attention a = {
		.ctx = c, .append = plugin_append, .attend = plugin_attend, .step = plugin_step
	};
	return a;
}

/* ---- sampling ---- */

int llama_argmax(const float *x, int n)
{
	int i, best = 0;

	for (i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

uint32_t llama_random_u32(uint64_t *state)
{
	*state ^= *state >> 12;
	*state ^= *state << 25;
	*state ^= *state >> 27;
	return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}

int llama_sample(float *logits, int n, float temperature, uint64_t *state)
{
	float max = logits[llama_argmax(logits, n)], sum = 0.0f, r, acc = 0.0f;
	int i;

	for (i = 0; i < n; i++) {
		logits[i] = expf((logits[i] - max) / temperature);
		sum += logits[i];
	}
	/* 24 random bits give a uniform float in [0, 1) */
	r = (float)(llama_random_u32(state) >> 8) / 16777216.0f * sum;
	for (i = 0; i < n; i++) {
		acc += logits[i];
		if (r < acc)
			return i;
	}
	return n - 1; /* rounding left r at the very top */
}
