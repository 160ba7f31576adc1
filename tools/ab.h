/*
 * tools/ab.h — the pieces of the A/B runner (kvpager-ab): one cache configuration measured against the
 * exact cache, on a token stream replayed from a trace or the synthetic generator (ab_replay.c) or run
 * through a model (kvpager-ab.c), and the reports of the measurements (ab_report.c).
 */
#ifndef KVP_TOOLS_AB_H
#define KVP_TOOLS_AB_H

#include <stdint.h>
#include <stdio.h>

#include "kvpager.h"
#include "tools/llama.h"

#define AB_MESSAGE_MAX 512

/*
 * The bytes a sequence held over a run, sampled once per position: after that position's appends (and
 * attention) to every layer, before the step's policy round, so a round's timing moves the peak and the
 * mean by one step at most. "Held" is bytes_exact + bytes_compressed + bytes_meta of kvp_seq_stats.
 */
struct ab_bytes_meter {
	uint64_t positions;            /* samples taken */
	double held_sum, dense_sum;    /* sums over the samples of held and of bytes_dense_fp16 */
	double positions_sum;          /* 1 + 2 + ... + positions */
	uint64_t held_peak, compressed_peak;
	double retained_peak;          /* most tokens retained per stream (tokens_retained / streams) */
	uint64_t meta_first, appended_first; /* bytes_meta and tokens_appended at the first sample */
};

/* Takes one sample: the stats of the sequence after its position `meter->positions + 1`. */
void ab_bytes_sample(struct ab_bytes_meter *m, const kvp_stats *st);
/* Adds the samples of one sequence's meter to into: a run over several sequences (the chunks of --text,
 * each from position 0) as one, its mean over every position of every sequence, its peak the largest. */
void ab_bytes_merge(struct ab_bytes_meter *into, const struct ab_bytes_meter *from);

/* --heads (ab_heads.c): every (layer, KV head)'s gating at the end of a spec's run. */
enum ab_heads_state { AB_HEADS_NONE, AB_HEADS_OFF, AB_HEADS_READ, AB_HEADS_UNSUPPORTED };
struct ab_heads {
	enum ab_heads_state state; /* NONE: not asked for or not read; OFF: the spec has gate=off */
	uint32_t n_layers, n_kv_heads;
	kvp_head_level *level; /* [n_layers][n_kv_heads] when READ */
};
/* Reads every head's level of seq (shape's layers and KV heads) into out, replacing what it held; 0, or -1
 * out of memory. */
int ab_heads_read(const kvp_plugin_v1 *api, kvp_seq *seq, const kvp_shape *shape, struct ab_heads *out);
void ab_heads_free(struct ab_heads *h);

/* What one spec measured. Values that the source cannot give (KL without logits) are NAN. */
struct ab_result {
	const char *spec;
	uint64_t tokens;         /* positions run */
	/* Bytes per token, all layers and KV heads (README, "Memory figures"): the mean over the run
	 * (sum of held over the samples / sum of the positions sampled), the peak (most held at a sample or
	 * at the end / tokens), the final snapshot (held after the last step / tokens). Mean and peak are
	 * NAN when meter took no sample. */
	double bytes_per_token, bytes_per_token_peak, bytes_per_token_final;
	double compression;       /* on the mean: sum of bytes_dense_fp16 / sum of held over the samples */
	double compression_final; /* bytes_dense_fp16 / held after the last step */
	uint64_t bytes_peak;      /* most bytes held */
	/* The pager's bookkeeping (bytes_meta): what the sequence held after its first position, whatever its
	 * length (its structs, scratch, the codecs' and the policy's fixed state), and what it grew by from
	 * there to the end per token appended per stream, a stream being one layer's K or V of one KV head
	 * (2 x n_layers x n_kv_heads of them). NAN without samples. */
	double meta_sequence, meta_per_token_stream;
	int cold_tier;            /* the spec has k= or v= */
	int cold_tier_used;       /* compressed bytes were held at a sample or at the end */
	struct ab_bytes_meter meter;
	double kl_mean, kl_p99;  /* next-token KL(full || this), nats */
	double top1;             /* share of positions whose argmax matches the full cache's, 0..1 */
	double attention_error;  /* mean over checked (step, layer) of |out - exact| / |exact| */
	double attention_error_max;
	double tokens_per_s;
	double perplexity;       /* exp(mean NLL) over the scored positions of --text; NAN without it */
	kvp_stats stats;
	struct ab_heads heads;   /* with --heads */
};

/* Per spec, the table of its heads' levels, bits and budgets (--heads). */
void ab_heads_print(FILE *f, const struct ab_result *r, int n);

#define AB_PROGRESS_LABEL_MAX 1024

/* A progress bar on stderr: drawn only on a terminal, and only once the run has taken a second (or the
 * seconds KVP_PROGRESS_AFTER gives, a number >= 0: 0 draws from the first token). */
struct ab_progress {
	int enabled, drawn;
	double start, last_draw, after;
	uint64_t done, total;
	char label[AB_PROGRESS_LABEL_MAX]; /* what advance shows when it is given no label */
};

void ab_progress_start(struct ab_progress *p, uint64_t total, int allowed);
/* n more tokens done; label, or p->label when label is NULL, is what is being done. */
void ab_progress_advance(struct ab_progress *p, uint64_t n, const char *label);
void ab_progress_end(struct ab_progress *p);
/*
 * The line the bar draws, into out: "[bar] 42% 1234/5000 tokens 612 tok/s ETA 0:12 label", at most
 * `columns` characters (the terminal's width): the bar is left out where it would leave the label less
 * than 60 columns, and a label too long for the rest loses its middle to "...",
 * keeping its beginning (which spec) and its end (which chunk). Returns out.
 */
char *ab_progress_format(const struct ab_progress *p, double now, const char *label, int columns, char *out,
			 size_t cap);
/*
 * Spec i (0-based) of specs[0..n-1] for the progress line: "spec 3 of 36 S3 policy=h2o(heavy=0.25)", the
 * S label of the table and plot, then what sets the spec apart: its text without the comma-separated
 * items every spec begins with, nor those they all end with (the whole spec when n is 1 or nothing is
 * left). Into buf; returns buf.
 */
char *ab_progress_spec_label(char *buf, size_t cap, const char *const *specs, int n, int i);
double ab_now(void);

/* The table on f: one row per spec, labelled S1..Sn as in the plot, so that long specs keep the figures on
 * the screen; the full specs follow in a key (ab_print_spec_key). title is printed above it. */
void ab_print_table(FILE *f, const char *title, const struct ab_result *r, int n);
/* "spec:" and one line per spec, "  S3   policy=...", the whole spec. */
void ab_print_spec_key(FILE *f, const struct ab_result *r, int n);
/* The width of the label column for n specs: "S" and n's digits, at least 4. */
int ab_label_width(int n);
/* The CSV and the SVG plot; 0, or -1 with message set. */
int ab_write_csv(const char *path, const struct ab_result *r, int n, char message[AB_MESSAGE_MAX]);
int ab_write_svg(const char *path, const char *title, const struct ab_result *r, int n,
		 char message[AB_MESSAGE_MAX]);
/*
 * The plot ab_write_svg writes, onto an open stream (the HTML report inlines it): log axes of bytes per
 * token against mean KL (attention error when no spec has KL), the best trade-off curve, labels S1..Sn
 * and a legend keying them to the specs. 0, or -1 out of memory.
 */
int ab_svg_plot(FILE *f, const char *title, const struct ab_result *r, int n);
/*
 * The best trade-off curve: on[i] = 1 when no spec has both fewer-or-equal bytes per token and a
 * lower-or-equal error, one of them strictly. The error is KL when any spec has KL (returns 1), else
 * the attention error (returns 0). Specs whose error is n/a are never on it.
 */
int ab_pareto(const struct ab_result *r, int n, int on[]);
/* s for HTML and SVG text and attribute values: & < > " ' as entities. */
void ab_markup_text(FILE *f, const char *s);
/*
 * The HTML report (ab_html.c): one page needing no network, with the table (sorted by clicking a
 * column's header) and the plot of ab_svg_plot. 0, or -1 with message set.
 */
int ab_write_html(const char *path, const char *title, const struct ab_result *r, int n,
		  char message[AB_MESSAGE_MAX]);

/* A stream of steps: every layer's q [n_layers][n_heads][d], k and v [n_layers][n_kv_heads][d]. */
struct ab_source {
	void *ctx;
	kvp_shape shape;
	uint64_t n_steps;
	/* 1 with a step, 0 at the end, -1 on an error that error() describes */
	int (*read_step)(void *ctx, int32_t *pos, float *q, float *k, float *v);
	int (*rewind)(void *ctx);
	const char *(*error)(void *ctx);
};

/* Exact attention outputs at the checked steps: [n_checked][n_layers][n_heads * head_dim]. */
struct ab_reference {
	float *outputs;
	uint64_t n_checked;
	uint32_t every; /* a step is checked when (step + 1) % every == 0, and the last always */
};

int ab_checked_step(const struct ab_reference *ref, uint64_t step, uint64_t n_steps);
/*
 * Reads the whole source once, computing exact softmax attention at the checked steps. Validates the
 * source on the way. Returns 0, 2 for a bad source, 1 otherwise; message says why.
 */
int ab_replay_reference(const struct ab_source *src, uint32_t every, struct ab_reference *ref,
			struct ab_progress *progress, char message[AB_MESSAGE_MAX]);
void ab_reference_free(struct ab_reference *ref);
/*
 * Replays the source through one cache spec of the plugin; with heads, reads every head's gating at the
 * end into out->heads. Returns 0, 2 when the library refuses the spec or its input, 1 otherwise; message
 * says why.
 */
int ab_replay_spec(const kvp_plugin_v1 *api, const char *pool_spec, const struct ab_source *src,
		   const struct ab_reference *ref, const char *spec, int heads, struct ab_result *out,
		   struct ab_progress *progress, char message[AB_MESSAGE_MAX]);

/* Opens and closes a sequence of this shape under spec: 0, or 2 / 1 as ab_replay_spec says. */
int ab_check_spec(const kvp_plugin_v1 *api, const char *pool_spec, const char *spec, const kvp_shape *shape,
		  char message[AB_MESSAGE_MAX]);
/* Fills the byte columns of a result from r->meter and the sequence's stats after `tokens` positions. */
void ab_result_bytes(struct ab_result *r, const kvp_stats *st, uint64_t tokens);
/* Tenant defaults (kvpager.h, "Tenant"): what a spec without block=, sinks= or window= gets. */
#define AB_TENANT_BLOCK 64
#define AB_TENANT_SINKS 4
#define AB_TENANT_WINDOW 128
/*
 * 1 when the spec alone shows that its cold tier (k=, v=) can receive no block in a run of `positions`:
 * a block turns cold only once a stream holds sinks + window + block tokens, and the run is shorter, or
 * its policy (streaming, or triattention with budget=, without gating) never keeps that many. why says
 * so. 0 when the spec has no cold tier or the spec alone does not decide it.
 */
int ab_cold_tier_unreachable(const char *spec, uint64_t positions, char why[AB_MESSAGE_MAX]);
/* What the tenant spec gives for a tenant key (block, sinks, window), else fallback. */
uint32_t ab_spec_u32(const char *spec, const char *key, uint32_t fallback);
/* 1 when the tenant spec has a key (k, v, policy) at its top level. */
int ab_spec_has(const char *spec, const char *key);

/* ---- perplexity over a text file, as llama.cpp's llama-perplexity computes it (ab_text.c) ---- */

/*
 * The whole file tokenized at once (BOS first, as llama-perplexity's tokenization adds it) and cut into
 * consecutive chunks of n_ctx tokens; a last partial chunk is dropped. Each chunk runs from position 0
 * with its first token replaced by BOS, and the logits at positions n_ctx/2 .. n_ctx-2 are scored
 * against the tokens that follow them: n_ctx - 1 - n_ctx/2 predictions per chunk, llama-perplexity's
 * `first = n_ctx/2` and `n_ctx - 1 - first`.
 */
struct ab_text {
	int *tokens;
	int n_tokens, n_ctx, n_chunks;
};

/* Reads path and tokenizes it; at most max_chunks chunks when max_chunks > 0. Returns 0; 2 for a file
 * that cannot be read, is empty, holds a NUL byte or is shorter than one chunk; 1 without memory. */
int ab_text_open(struct ab_text *t, const struct llama_tokenizer *tok, const char *path, int n_ctx,
		 int max_chunks, char message[AB_MESSAGE_MAX]);
void ab_text_close(struct ab_text *t);
int ab_text_first_scored(const struct ab_text *t);     /* n_ctx / 2 */
int ab_text_scored_per_chunk(const struct ab_text *t); /* n_ctx - 1 - n_ctx / 2 */
/* The token at position pos of chunk: BOS at position 0. */
int ab_text_token(const struct ab_text *t, int chunk, int pos);

/* What one cache measured over the chunks run so far. */
struct ab_text_score {
	double nll;        /* sum of -log p(the next token) */
	double kl_sum;     /* sum of KL(full cache || this) */
	double *kl;        /* [n_chunks * scored per chunk] */
	uint64_t n_scored, agreed;
	double seconds;    /* forward passes of the chunks */
	kvp_stats summed;  /* the sequence's stats at each chunk's end, summed over chunks */
	uint64_t end_held_peak;      /* the most held at a chunk's end */
	struct ab_bytes_meter meter; /* every position of every chunk, merged (ab_bytes_merge) */
};

/* The model side: activations, and the full cache's log-probabilities on the current chunk. */
struct ab_text_model {
	const struct llama_model *model;
	struct llama_state state;
	float *reference; /* [scored per chunk][vocab] */
	float *log_probs; /* [vocab] */
};

int ab_text_model_open(struct ab_text_model *m, const struct llama_model *model, const struct ab_text *t);
void ab_text_model_close(struct ab_text_model *m);
int ab_text_score_open(struct ab_text_score *s, const struct ab_text *t);
void ab_text_score_close(struct ab_text_score *s);

/*
 * Runs chunk through the model with att as its cache (fresh: the caller opens it), scoring the second
 * half; the reference run (the full cache) keeps its log-probabilities, every other run is compared
 * with them. progress advances one per position, labelled with label. Returns 0, or llama_forward's failure.
 */
int ab_text_run_chunk(struct ab_text_model *m, const struct ab_text *t, int chunk,
		      const struct llama_attention *att, int is_reference, struct ab_text_score *s,
		      struct ab_progress *progress, const char *label);
/* Adds a sequence's stats at the end of a chunk, and the meter of its positions. */
void ab_text_add_stats(struct ab_text_score *s, const kvp_stats *st, const struct ab_bytes_meter *chunk);
/* Fills perplexity, KL, top-1, tokens/s and the byte columns of r from s: the mean over every position
 * of every chunk (sum of held over the samples / sum of the positions, as the other sources), the peak
 * as the most one chunk's sequence held (per token: over n_ctx), the final from the summed end-of-chunk
 * stats over every token appended. */
void ab_text_result(const struct ab_text_score *s, const struct ab_text *t, struct ab_result *r);
/* The table of the text mode: the full cache's perplexity (row "full"), then one row per spec labelled
 * S1..Sn, and the key of the labels. */
void ab_print_text_table(FILE *f, const char *title, double full_perplexity, const struct ab_result *r, int n);

/* log-softmax of n logits into out, in double inside */
void ab_log_softmax(const float *logits, int n, float *out);
/* p99 by the nearest rank (sorts x) */
double ab_percentile99(double *x, int n);

/* ---- --prefix-share: prompts sharing a prefix through the prefix cache (ab_prefix.c) ---- */

struct ab_prefix_run {
	const char *model_path, *pool, *spec; /* spec: the tenant's, model= added unless it has one */
	int count, length, shared, steps;      /* prompts, tokens each, tokens all share, greedy tokens after */
	char model_name[64];                   /* model=: the checkpoint's file name */
	int32_t *ids;                          /* [length]: the prompt handed to seq_open_prefix */
	uint32_t *n_cached;                    /* [count] */
	int *equal;                            /* [count]: 1 when its greedy tokens equal the run without the cache */
	kvp_stats stats;                       /* the tenant's after the last prompt */
};

/*
 * count prompts of length tokens into prompts[count][length]: the first 3/4 (the return value) are
 * source's, and what follows them is the text after that in source, prompt k taking the k-th stretch;
 * where source is too short for that, the same tail with its first token changed for each prompt. -1
 * when source is shorter than one prompt, length < 2, count < 1 or two prompts come out equal.
 */
int ab_prefix_prompts(const int *source, int n_source, int length, int count, int vocab, int *prompts);
/* Runs r->count prompts (r->length tokens each, r->steps greedy tokens after) without the prefix cache
 * and then through it; fills r. 0; 2 for a spec or plugin that cannot serve it; 1 otherwise. message
 * says why. */
int ab_prefix_share(const kvp_plugin_v1 *api, const struct llama_model *m, struct ab_prefix_run *r,
		    const int *prompts, char message[AB_MESSAGE_MAX]);
void ab_prefix_print(FILE *f, const struct ab_prefix_run *r);
/* 1 when every prompt's greedy tokens equal the run without the cache */
int ab_prefix_all_equal(const struct ab_prefix_run *r);
void ab_prefix_free(struct ab_prefix_run *r);

#endif /* KVP_TOOLS_AB_H */
