/*
 * tools/llama.h — a llama2.c-checkpoint model for the kvpager tools and tests.
 *
 * The checkpoint loader (legacy v0 format), the 512/32000-token tokenizer (tok512.bin, tokenizer.bin),
 * BPE encode/decode with run.c's behaviour, and the forward pass of one token. Attention is not done
 * here: the forward pass hands post-RoPE keys, values and queries to a struct llama_attention, so the
 * exact in-process dense cache (the baseline) and the kvpager plugin plug in the same way.
 *
 * Pure C11 plus libm; kvpager.h is included for its types only (the plugin attention calls the library
 * through a kvp_plugin_v1 table the host obtained, never by symbol).
 */
#ifndef KVP_TOOLS_LLAMA_H
#define KVP_TOOLS_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "kvpager.h"

/* Return values of the llama_ calls. */
enum llama_status {
	LLAMA_OK = 0,
	LLAMA_EINPUT = -1,     /* a file or argument is missing, truncated or inconsistent */
	LLAMA_ENOMEM = -2,     /* allocation failed */
	LLAMA_EATTENTION = -3, /* an attention callback failed; its context says why */
};

/* Room for a message naming the file and the problem. */
#define LLAMA_ERROR_MAX 512

enum { LLAMA_TOKEN_BOS = 1, LLAMA_TOKEN_EOS = 2, LLAMA_TOKEN_BYTE0 = 3 };

struct llama_config {
	int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
	int head_size;         /* dim / n_heads */
	int kv_dim;            /* n_kv_heads * head_size */
	int shared_classifier; /* 1 when the classifier is the token embedding table */
};

struct llama_model {
	struct llama_config config;
	float *data; /* every float after the header, owned */
	size_t n_floats;
	/* views into data; per-layer tensors are [n_layers][rows][cols] */
	const float *token_embedding; /* [vocab][dim] */
	const float *rms_att, *rms_ffn; /* [n_layers][dim] */
	const float *wq, *wk, *wv, *wo; /* [n_layers][dim or kv_dim][dim] */
	const float *w1, *w3;           /* [n_layers][hidden_dim][dim] */
	const float *w2;                /* [n_layers][dim][hidden_dim] */
	const float *rms_final;         /* [dim] */
	const float *wcls;              /* [vocab][dim] */
};

/* Reads a checkpoint. On failure the model is left empty and err names the file and the problem. */
int llama_model_load(struct llama_model *m, const char *path, char err[LLAMA_ERROR_MAX]);
void llama_model_free(struct llama_model *m);
/* The kvpager shape of the model (interleaved RoPE, theta 10000). */
kvp_shape llama_model_shape(const struct llama_config *c);

/* One entry of the lookup index: a piece's bytes and its id. */
struct llama_piece_index {
	const char *text;
	uint32_t length;
	int id;
};

struct llama_tokenizer {
	int vocab_size, max_token_length;
	char **pieces;                   /* [vocab_size], each NUL-terminated (pieces hold no NUL) */
	uint32_t *lengths;               /* [vocab_size] */
	float *scores;                   /* [vocab_size]: the merge order, higher first */
	struct llama_piece_index *index; /* [vocab_size], ordered by bytes, for lookups */
	unsigned char bytes[256];        /* what a <0xHH> piece decodes to */
};

/* vocab_size comes from the model header: the file does not store it. */
int llama_tokenizer_load(struct llama_tokenizer *t, const char *path, int vocab_size,
			 char err[LLAMA_ERROR_MAX]);
void llama_tokenizer_free(struct llama_tokenizer *t);
/* The id of a piece given by its bytes, or -1. */
int llama_tokenizer_find(const struct llama_tokenizer *t, const char *piece, size_t len);
/*
 * BPE-encodes text as run.c does: optional BOS, a dummy-prefix space when text is not empty, one id per
 * UTF-8 character (byte-fallback ids 3..258 for unknown ones), then greedy merges of the adjacent pair
 * with the best score. ids needs room for strlen(text) + 3 entries. Returns the number of ids written.
 */
int llama_encode(const struct llama_tokenizer *t, const char *text, int bos, int eos, int *ids);
/*
 * The bytes token id stands for, given the previous token: a leading space is dropped right after BOS,
 * and <0xHH> pieces give the raw byte. The result points into the tokenizer; *len receives its length.
 */
const char *llama_decode(const struct llama_tokenizer *t, int prev, int id, size_t *len);

/*
 * Attention as a service to the forward pass. For each layer of each token the forward pass calls
 * append(layer, pos, k, v) with k, v: [n_kv_heads][head_size], k after RoPE, then attend(layer, pos, q,
 * out) with q, out: [n_heads][head_size], q after RoPE. After the last layer it calls step (if set).
 * Each returns 0 or a nonzero failure, which the forward pass reports as LLAMA_EATTENTION.
 */
struct llama_attention {
	void *ctx;
	int (*append)(void *ctx, int layer, int pos, const float *k, const float *v);
	int (*attend)(void *ctx, int layer, int pos, const float *q, float *out);
	int (*step)(void *ctx);
};

/* What an observer sees of a layer, in the order the forward pass produces it. */
enum llama_tap {
	LLAMA_TAP_Q_PRE_ROPE, /* [n_heads][head_size] */
	LLAMA_TAP_K_PRE_ROPE, /* [n_kv_heads][head_size] */
	LLAMA_TAP_Q,          /* after RoPE */
	LLAMA_TAP_K,          /* after RoPE: what the cache stores */
	LLAMA_TAP_V,          /* [n_kv_heads][head_size] */
	LLAMA_TAP_ATTENTION,  /* attention output before wo: [n_heads][head_size] */
};

struct llama_observer {
	void *ctx;
	void (*observe)(void *ctx, enum llama_tap tap, int layer, int pos, const float *x, int n);
};

/* Activations of one forward pass; logits hold the last result. */
struct llama_state {
	float *x, *xb, *xb2, *hb, *hb2, *q, *q_pre_rope, *k, *v, *att_out, *logits;
};

int llama_state_init(struct llama_state *s, const struct llama_config *c);
void llama_state_free(struct llama_state *s);

/*
 * Runs token at position pos through the model; the logits land in s->logits. observer may be NULL.
 * Returns LLAMA_OK, LLAMA_EINPUT for a token or position outside the model, or LLAMA_EATTENTION.
 */
int llama_forward(const struct llama_model *m, struct llama_state *s, const struct llama_attention *att,
		  const struct llama_observer *observer, int token, int pos);

/* The exact cache: every key and value of every position, fp32, softmax over all of them. */
struct llama_dense_cache {
	struct llama_config config;
	float *keys, *values; /* [n_layers][seq_len][kv_dim] */
	float *scores;        /* [seq_len] */
	int *length;          /* [n_layers]: positions 0..length-1 are held */
};

int llama_dense_cache_init(struct llama_dense_cache *c, const struct llama_config *config);
void llama_dense_cache_free(struct llama_dense_cache *c);
struct llama_attention llama_dense_attention(struct llama_dense_cache *c);

/*
 * Attention through the kvpager plugin table: one pool, one tenant ("llama"), one sequence.
 * A failing call leaves its status in status and kvp_last_error() in message.
 */
struct llama_plugin_cache {
	const kvp_plugin_v1 *api;
	kvp_pool *pool;
	kvp_tenant *tenant;
	kvp_seq *seq;
	int n_kv_heads, head_size;
	kvp_status status;
	char message[LLAMA_ERROR_MAX];
};

/* Returns LLAMA_EINPUT for a spec the library rejects, LLAMA_ENOMEM otherwise; message says why. */
int llama_plugin_cache_open(struct llama_plugin_cache *c, const kvp_plugin_v1 *api,
			    const struct llama_config *config, const char *pool_spec, const char *cache_spec);
void llama_plugin_cache_close(struct llama_plugin_cache *c);
struct llama_attention llama_plugin_attention(struct llama_plugin_cache *c);

/* sum_j a[j] b[j]; eight running sums let the compiler use vector lanes without -ffast-math. The dense
 * references (this file's exact cache, kvpager-ab's trace replay) share it. */
float llama_dot(const float *a, const float *b, int n);

/* Sampling */
int llama_argmax(const float *x, int n);
/* xorshift64* generator; the state must not be 0 */
uint32_t llama_random_u32(uint64_t *state);
/* Samples from softmax(logits / temperature); logits are overwritten. temperature > 0. */
int llama_sample(float *logits, int n, float temperature, uint64_t *state);

#endif /* KVP_TOOLS_LLAMA_H */
