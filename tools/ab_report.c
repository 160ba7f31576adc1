/*
 * tools/ab_report.c — what kvpager-ab shows: the table, the CSV, the SVG plot of memory against
 * fidelity, and the progress bar.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "tools/ab.h"

#define PROGRESS_WIDTH 30
#define PROGRESS_LABEL_ROOM 60 /* columns the label should have; the bar goes first when they lack */

double ab_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- progress ---- */

/* KVP_PROGRESS_AFTER, or 1 second where it is unset or not a number >= 0 */
static double progress_after(void)
{
	const char *env = getenv("KVP_PROGRESS_AFTER");
	char *end;
	double s = env ? strtod(env, &end) : 1.0;

	return env && (end == env || *end || !(s >= 0.0)) ? 1.0 : s;
}

void ab_progress_start(struct ab_progress *p, uint64_t total, int allowed)
{
	memset(p, 0, sizeof(*p));
	p->enabled = allowed && isatty(STDERR_FILENO);
	p->total = total ? total : 1;
	p->start = ab_now();
	p->after = progress_after();
}

/* The terminal's width, for a line that must not wrap (a wrapped line's \r redraws only its last row). */
static int terminal_columns(void)
{
	struct winsize ws;
	const char *env = getenv("COLUMNS");

	if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
		return ws.ws_col;
	return env && atoi(env) > 0 ? atoi(env) : 120;
}

char *ab_progress_format(const struct ab_progress *p, double now, const char *label, int columns, char *out,
			 size_t cap)
{
	double share = p->done >= p->total ? 1.0 : (double)p->done / (double)p->total, elapsed = now - p->start;
	double left = share > 0 ? elapsed * (1.0 - share) / share : 0;
	unsigned eta = left < 359999 ? (unsigned)(left + 0.5) : 359999;
	int filled = (int)(share * PROGRESS_WIDTH), i, head;
	size_t len = strlen(label), room;
	char bar[PROGRESS_WIDTH + 1];

	for (i = 0; i < PROGRESS_WIDTH; i++)
		bar[i] = i < filled ? '#' : '.';
	bar[PROGRESS_WIDTH] = '\0';
	for (int with_bar = 1; with_bar >= 0; with_bar--) {
		head = snprintf(out, cap, "%s%s%s%3.0f%% %llu/%llu tokens %.0f tok/s ETA %u:%02u ", with_bar ? "[" : "",
				with_bar ? bar : "", with_bar ? "] " : "", 100.0 * share, (unsigned long long)p->done,
				(unsigned long long)p->total, elapsed > 0 ? (double)p->done / elapsed : 0.0, eta / 60,
				eta % 60);
		if (columns - head >= PROGRESS_LABEL_ROOM) /* a narrow terminal: the label before the bar */
			break;
	}
	if (head < 0 || (size_t)head >= cap)
		return out;
	room = columns - 1 > head + 8 ? (size_t)(columns - 1 - head) : 8; /* the last column would wrap */
	room = room < cap - (size_t)head ? room : cap - (size_t)head - 1;
	if (len <= room)
		memcpy(out + head, label, len + 1);
	else { /* the beginning says which spec, the end which chunk: the middle goes */
		size_t keep = room - 3, front = keep / 2;

		snprintf(out + head, cap - (size_t)head, "%.*s...%s", (int)front, label, label + len - (keep - front));
	}
	return out;
}

/* Whether a common prefix of n characters of spec ends an item ("a=1," or "p(") */
static size_t prefix_at_item(const char *spec, size_t n)
{
	while (n > 0 && spec[n - 1] != ',' && spec[n - 1] != '(')
		n--;
	return n;
}

/* The common suffix of n characters, shortened to start at an item's comma (",k=turboquant(bits=3)"). */
static size_t suffix_at_item(const char *spec, size_t len, size_t n)
{
	while (n > 0 && spec[len - n] != ',')
		n--;
	return n;
}

char *ab_progress_spec_label(char *buf, size_t cap, const char *const *specs, int n, int i)
{
	const char *spec = specs[i];
	size_t len = strlen(spec), pre = len, suf = len, k;
	int j;

	for (j = 0; j < n; j++) {
		size_t lj = strlen(specs[j]);

		for (k = 0; k < pre && k < lj && specs[j][k] == spec[k]; k++)
			;
		pre = k;
		for (k = 0; k < suf && k < lj && specs[j][lj - 1 - k] == spec[len - 1 - k]; k++)
			;
		suf = k;
	}
	pre = n > 1 ? prefix_at_item(spec, pre) : 0;
	suf = n > 1 ? suffix_at_item(spec, len, suf) : 0;
	if (pre + suf >= len) /* nothing of its own left (the same spec twice, or one inside another) */
		pre = suf = 0;
	if (!len)
		snprintf(buf, cap, "spec %d of %d S%d \"\" (default)", i + 1, n, i + 1);
	else
		snprintf(buf, cap, "spec %d of %d S%d %.*s", i + 1, n, i + 1, (int)(len - pre - suf), spec + pre);
	return buf;
}

void ab_progress_advance(struct ab_progress *p, uint64_t n, const char *label)
{
	char line[2 * AB_PROGRESS_LABEL_MAX];
	double now;

	if (!p)
		return;
	p->done += n;
	if (!p->enabled)
		return;
	now = ab_now();
	/* nothing for short runs, and at most ten redraws a second */
	if (now - p->start < p->after || now - p->last_draw < 0.1)
		return;
	p->last_draw = now;
	ab_progress_format(p, now, label ? label : p->label, terminal_columns(), line, sizeof(line));
	fprintf(stderr, "\r%s\033[K", line);
	fflush(stderr);
	p->drawn = 1;
}

void ab_progress_end(struct ab_progress *p)
{
	if (p->drawn)
		fputs("\r\033[K", stderr);
	p->drawn = 0;
}

/* ---- table ---- */

static const char *spec_label(const char *spec)
{
	return spec[0] ? spec : "\"\" (default)";
}

static void cell(FILE *f, int width, const char *fmt, double v)
{
	if (isnan(v))
		fprintf(f, " %*s", width, "n/a");
	else
		fprintf(f, fmt, width, v);
}

/*
 * A cold tier that never held a byte: the codecs of the spec did nothing, so the row measures the policy
 * alone. A block turns cold once a full block lies between the sinks and the hot window.
 */
static void print_unused_cold_tier(FILE *f, const struct ab_result *r)
{
	uint32_t block = ab_spec_u32(r->spec, "block", AB_TENANT_BLOCK);
	uint32_t sinks = ab_spec_u32(r->spec, "sinks", AB_TENANT_SINKS);
	uint32_t window = ab_spec_u32(r->spec, "window", AB_TENANT_WINDOW);
	unsigned long long exact = (unsigned long long)sinks + window, needed = exact + block;

	fprintf(f, "note: '%s': its cold tier (k=/v=) never received a block: ", spec_label(r->spec));
	if (r->meter.positions && r->meter.retained_peak + 0.5 < (double)r->meter.positions)
		fprintf(f, "the policy kept at most %.0f tokens per stream, ", r->meter.retained_peak);
	else if (r->meter.positions)
		fprintf(f, "the run has %llu positions, ", (unsigned long long)r->meter.positions);
	fprintf(f, "the sinks and the hot window take %llu (sinks=%u, window=%u), and a block turns cold only "
		"once a full block=%u lies beyond them (%llu tokens)", exact, sinks, window, block, needed);
	if (r->meter.positions && r->meter.retained_peak >= (double)needed)
		fputs("; no full block had left the hot window by the end", f);
	fputs("\n", f);
}

int ab_label_width(int n)
{
	char label[16];
	int w = snprintf(label, sizeof(label), "S%d", n > 0 ? n : 1);

	return w > 4 ? w : 4;
}

void ab_print_spec_key(FILE *f, const struct ab_result *r, int n)
{
	int width = ab_label_width(n), i;
	char label[16];

	fputs("spec:\n", f);
	for (i = 0; i < n; i++) {
		snprintf(label, sizeof(label), "S%d", i + 1);
		fprintf(f, "  %-*s %s\n", width, label, spec_label(r[i].spec));
	}
}

void ab_print_table(FILE *f, const char *title, const struct ab_result *r, int n)
{
	int width = ab_label_width(n), i;
	char label[16];

	fprintf(f, "%s\n", title);
	fprintf(f, "%-*s %11s %8s %9s %8s %9s %9s %8s %9s %9s %9s\n", width, "spec", "bytes/tok", "final",
		"peak KiB", "vs fp16", "KL mean", "KL p99", "top-1", "attn err", "tok/s", "meta/tok");
	for (i = 0; i < n; i++) {
		snprintf(label, sizeof(label), "S%d", i + 1);
		fprintf(f, "%-*s", width, label);
		cell(f, 11, " %*.1f", r[i].bytes_per_token);
		cell(f, 8, " %*.1f", r[i].bytes_per_token_final);
		cell(f, 9, " %*.1f", (double)r[i].bytes_peak / 1024.0);
		if (isnan(r[i].compression))
			fprintf(f, " %8s", "n/a");
		else
			fprintf(f, " %7.2fx", r[i].compression);
		cell(f, 9, " %*.2e", r[i].kl_mean);
		cell(f, 9, " %*.2e", r[i].kl_p99);
		if (isnan(r[i].top1))
			fprintf(f, " %8s", "n/a");
		else
			fprintf(f, " %7.2f%%", 100.0 * r[i].top1);
		cell(f, 9, " %*.2e", r[i].attention_error);
		cell(f, 9, " %*.0f", r[i].tokens_per_s);
		cell(f, 9, " %*.2f", r[i].meta_per_token_stream);
		fputc('\n', f);
	}
	ab_print_spec_key(f, r, n);
	fputs("bytes/tok: the run's mean (bytes held after each position, summed, over the positions summed); "
	      "final: held at the end per token; peak: the most held at once; vs fp16: on the mean; "
	      "meta/tok: what bytes_meta grew by after the first position, per token per stream (one layer's K or "
	      "V of one KV head)\n", f);
	for (i = 0; i < n; i++)
		if (r[i].cold_tier && !r[i].cold_tier_used)
			print_unused_cold_tier(f, &r[i]);
}

/* ---- CSV ---- */

static int report_fail(char message[AB_MESSAGE_MAX], const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int report_fail(char message[AB_MESSAGE_MAX], const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(message, AB_MESSAGE_MAX, fmt, ap);
	va_end(ap);
	return -1;
}

/* A field in RFC 4180 quotes: specs hold commas. */
static void csv_text(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		if (*s == '"')
			fputc('"', f);
		fputc(*s, f);
	}
	fputc('"', f);
}

/* Unmeasured values are empty fields. */
static void csv_number(FILE *f, double v)
{
	if (isnan(v))
		fputc(',', f);
	else
		fprintf(f, ",%.9g", v);
}

static int finish_file(FILE *f, const char *path, char message[AB_MESSAGE_MAX])
{
	int bad = ferror(f);

	if (fclose(f) != 0 || bad)
		return report_fail(message, "%s: write failed: %s", path, strerror(errno));
	return 0;
}

int ab_write_csv(const char *path, const struct ab_result *r, int n, char message[AB_MESSAGE_MAX])
{
	FILE *f = fopen(path, "w");
	int i;

	if (!f)
		return report_fail(message, "%s: cannot create: %s", path, strerror(errno));
	fputs("spec,tokens,bytes_per_token_mean,compression_vs_fp16_mean,kl_mean,kl_p99,top1_agreement,"
	      "attention_rel_error,attention_rel_error_max,tokens_per_s,bytes_exact,bytes_compressed,"
	      "bytes_meta,bytes_dense_fp16,bytes_per_token_peak,bytes_per_token_final,compression_vs_fp16_final,"
	      "bytes_peak,bytes_compressed_peak,cold_tier,cold_tier_used,perplexity,meta_bytes_per_token_stream,"
	      "meta_bytes_sequence\n", f);
	for (i = 0; i < n; i++) {
		csv_text(f, r[i].spec);
		fprintf(f, ",%llu", (unsigned long long)r[i].tokens);
		csv_number(f, r[i].bytes_per_token);
		csv_number(f, r[i].compression);
		csv_number(f, r[i].kl_mean);
		csv_number(f, r[i].kl_p99);
		csv_number(f, r[i].top1);
		csv_number(f, r[i].attention_error);
		csv_number(f, r[i].attention_error_max);
		csv_number(f, r[i].tokens_per_s);
		fprintf(f, ",%llu,%llu,%llu,%llu", (unsigned long long)r[i].stats.bytes_exact,
			(unsigned long long)r[i].stats.bytes_compressed, (unsigned long long)r[i].stats.bytes_meta,
			(unsigned long long)r[i].stats.bytes_dense_fp16);
		csv_number(f, r[i].bytes_per_token_peak);
		csv_number(f, r[i].bytes_per_token_final);
		csv_number(f, r[i].compression_final);
		fprintf(f, ",%llu,%llu,%d", (unsigned long long)r[i].bytes_peak,
			(unsigned long long)r[i].meter.compressed_peak, r[i].cold_tier);
		/* whether a tier that is not there was used is not a question: an empty field */
		if (r[i].cold_tier)
			fprintf(f, ",%d", r[i].cold_tier_used);
		else
			fputs(",", f);
		csv_number(f, r[i].perplexity); /* --text only */
		csv_number(f, r[i].meta_per_token_stream);
		csv_number(f, r[i].meta_sequence);
		fputs("\n", f);
	}
	return finish_file(f, path, message);
}

/* ---- SVG ---- */

/*
 * The plot: log-scaled axes, so one outlier cannot squash the rest; every spec a marker of its own
 * (10 colours times 5 shapes) with a short label S1..Sn placed clear of the other labels and markers;
 * the best trade-off curve drawn through the specs no other spec beats on both bytes and error; and a
 * legend under the plot keying each label to the full spec, wrapped, never cut. The width follows the
 * longest title or legend entry, up to SVG_MAX_WIDTH, past which lines wrap.
 */
#define SVG_MIN_WIDTH 760
#define SVG_MAX_WIDTH 1200
#define SVG_MARGIN 16
#define SVG_LEFT 84 /* the y tick labels and the y axis name */
#define SVG_RIGHT 24
#define SVG_PLOT_HEIGHT 380
#define SVG_TITLE_LINE 20
#define SVG_LEGEND_LINE 16
#define SVG_LEGEND_TEXT 56 /* from the legend's left edge to its spec text */
/* Text widths are estimated, not measured: 12 px monospace is 0.6 em a character; 14 px sans-serif
 * averages about 0.5 em (0.56 assumed). Estimating high only costs some white space. */
#define SVG_MONO_CHAR 7.3
#define SVG_TITLE_CHAR 7.8
#define SVG_LABEL_CHAR 6.8 /* the 11 px S-labels */
#define SVG_LABEL_HEIGHT 12.0

static const char *const svg_colors[] = { "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
					  "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22" };
#define SVG_N_COLORS ((int)(sizeof(svg_colors) / sizeof(svg_colors[0])))
#define SVG_N_SHAPES 5

static void markup_n(FILE *f, const char *s, size_t n)
{
	size_t i;

	for (i = 0; i < n && s[i]; i++) {
		switch (s[i]) {
		case '<': fputs("&lt;", f); break;
		case '>': fputs("&gt;", f); break;
		case '&': fputs("&amp;", f); break;
		case '"': fputs("&quot;", f); break;
		case '\'': fputs("&#39;", f); break;
		default: fputc(s[i], f);
		}
	}
}

void ab_markup_text(FILE *f, const char *s)
{
	markup_n(f, s, strlen(s));
}

/* What a plot's y axis shows: KL where the source gives it, else the attention error; perplexity in a
 * second plot with --text. */
enum plot_y { PLOT_ATTENTION, PLOT_KL, PLOT_PERPLEXITY };

static double plot_value(const struct ab_result *r, enum plot_y y)
{
	return y == PLOT_KL ? r->kl_mean : y == PLOT_PERPLEXITY ? r->perplexity : r->attention_error;
}

static const char *plot_name(enum plot_y y)
{
	return y == PLOT_KL ? "KL" : y == PLOT_PERPLEXITY ? "perplexity" : "attention error";
}

/* on[i] = 1 when no spec has both fewer-or-equal bytes and a lower-or-equal y, one of them strictly. */
static void front_of(const struct ab_result *r, int n, enum plot_y y, int on[])
{
	int i, j;

	for (i = 0; i < n; i++) {
		double xi = r[i].bytes_per_token, yi = plot_value(&r[i], y);

		on[i] = !isnan(xi) && !isnan(yi);
		for (j = 0; j < n && on[i]; j++) {
			double xj = r[j].bytes_per_token, yj = plot_value(&r[j], y);

			if (xj <= xi && yj <= yi && (xj < xi || yj < yi))
				on[i] = 0;
		}
	}
}

int ab_pareto(const struct ab_result *r, int n, int on[])
{
	int i, use_kl = 0;

	for (i = 0; i < n; i++)
		use_kl |= !isnan(r[i].kl_mean);
	front_of(r, n, use_kl ? PLOT_KL : PLOT_ATTENTION, on);
	return use_kl;
}

/* The first line of s in at most cap characters: after the last ',', ' ' or '|' in its second half,
 * else cut at cap. */
static size_t wrap_len(const char *s, size_t cap)
{
	size_t len = strlen(s), i;

	if (len <= cap || cap == 0)
		return len;
	for (i = cap; i > cap / 2; i--)
		if (strchr(", |", s[i - 1]))
			return i;
	return cap;
}

static int wrap_lines(const char *s, size_t cap)
{
	int lines = 0;

	do {
		s += wrap_len(s, cap);
		lines++;
	} while (*s);
	return lines;
}

/* s in lines of at most cap characters, one tspan each, from (x, y) down. */
static void svg_wrapped(FILE *f, const char *s, size_t cap, double x, double y, int line_height)
{
	do {
		size_t n = wrap_len(s, cap);

		fprintf(f, "<tspan x=\"%.1f\" y=\"%.1f\">", x, y);
		markup_n(f, s, n);
		fputs("</tspan>", f);
		s += n;
		y += line_height;
	} while (*s);
}

/* A log10 axis: [lo, hi] in decades onto pixels from `from` over `span` (negative going up). */
struct log_axis {
	double lo, hi, from, span;
	int has_zero; /* a value of 0 is drawn on the floor line, at `from` */
};

/* min_span: the fewest decades the axis spans (KL: 0.4, a few ticks of 1..9; perplexity, whose values
 * differ by tenths of a percent: 0.004) */
static void axis_fit(struct log_axis *a, const double *v, int n, double min_span)
{
	double lo = INFINITY, hi = -INFINITY, pad, mid;
	int i;

	a->has_zero = 0;
	for (i = 0; i < n; i++) {
		if (isnan(v[i]))
			continue;
		if (v[i] <= 0) {
			a->has_zero = 1;
			continue;
		}
		lo = fmin(lo, log10(v[i]));
		hi = fmax(hi, log10(v[i]));
	}
	if (lo > hi) {
		lo = -3;
		hi = 0;
	}
	if (hi - lo < min_span) {
		mid = (lo + hi) / 2;
		lo = mid - min_span / 2;
		hi = mid + min_span / 2;
	}
	pad = 0.06 * (hi - lo);
	a->lo = lo - pad - (a->has_zero ? 0.1 * (hi - lo) : 0); /* a band between the floor and the least */
	a->hi = hi + pad;
}

static double axis_pos(const struct log_axis *a, double v)
{
	if (!(v > 0))
		return a->from;
	return a->from + (log10(v) - a->lo) / (a->hi - a->lo) * a->span;
}

static void tick_text(char *buf, size_t cap, double v)
{
	snprintf(buf, cap, v >= 1e-3 && v < 1e6 ? "%g" : "%.0e", v);
}

static void svg_tick(FILE *f, const struct log_axis *a, int vertical, double across0, double across1, double v,
		     int minor)
{
	double p = axis_pos(a, v);
	char label[32];

	tick_text(label, sizeof(label), v);
	if (vertical)
		fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>"
			"<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
			across0, p, across1, p, minor ? "#eee" : "#ccc", across0 - 6, p + 4, label);
	else
		fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>"
			"<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
			p, across0, p, across1, minor ? "#eee" : "#ccc", p, across1 + 16, label);
}

/* An axis within one 1..9 step (perplexities): 4-8 ticks at round steps of 1, 2 or 5 times 10^k. */
static void svg_fine_ticks(FILE *f, const struct log_axis *a, int vertical, double across0, double across1)
{
	double lo = pow(10, a->lo), hi = pow(10, a->hi), step = pow(10, floor(log10((hi - lo) / 4)));
	long k;

	step *= (hi - lo) / step >= 20 ? 5 : (hi - lo) / step >= 8 ? 2 : 1;
	for (k = (long)ceil(lo / step); (double)k * step <= hi; k++)
		svg_tick(f, a, vertical, across0, across1, (double)k * step, 0);
}

/* Grid lines and labels at 1, 2, 5 (or 1..9, or only decades, as the range allows) times 10^k. */
static void svg_ticks(FILE *f, const struct log_axis *a, int vertical, double across0, double across1)
{
	static const double all[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, some[] = { 1, 2, 5 }, decade[] = { 1 };
	double decades = a->hi - a->lo, step = decades > 8 ? ceil(decades / 8) : 1, k;
	const double *mult = decades > 2.5 ? decade : decades > 1 ? some : all;
	int n_mult = decades > 2.5 ? 1 : decades > 1 ? 3 : 9, m;

	if (decades < 0.3)
		svg_fine_ticks(f, a, vertical, across0, across1);
	else
		for (k = floor(a->lo); k <= ceil(a->hi); k += step)
			for (m = 0; m < n_mult; m++) {
				double v = mult[m] * pow(10, k);

				if (log10(v) >= a->lo && log10(v) <= a->hi)
					svg_tick(f, a, vertical, across0, across1, v, m);
			}
	if (a->has_zero && vertical)
		fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#999\" "
			"stroke-dasharray=\"4 3\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">0</text>\n",
			across0, a->from, across1, a->from, across0 - 6, a->from + 4);
	else if (a->has_zero)
		fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#999\" "
			"stroke-dasharray=\"4 3\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">0</text>\n",
			a->from, across0, a->from, across1, a->from, across1 + 16);
}

/* Spec i's marker, centred on the origin: colour i % 10, and a shape that differs between any two of
 * the first 50 specs sharing a colour. */
static void svg_marker(FILE *f, int i)
{
	const char *c = svg_colors[i % SVG_N_COLORS];

	switch ((i + i / SVG_N_COLORS) % SVG_N_SHAPES) {
	case 0: fprintf(f, "<circle r=\"5\" fill=\"%s\"/>", c); break;
	case 1: fprintf(f, "<rect x=\"-4.5\" y=\"-4.5\" width=\"9\" height=\"9\" fill=\"%s\"/>", c); break;
	case 2: fprintf(f, "<polygon points=\"0,-6 5.5,4 -5.5,4\" fill=\"%s\"/>", c); break;
	case 3: fprintf(f, "<polygon points=\"0,-6 6,0 0,6 -6,0\" fill=\"%s\"/>", c); break;
	default: fprintf(f, "<path d=\"M-5,-5L5,5M-5,5L5,-5\" stroke=\"%s\" stroke-width=\"2.5\"/>", c);
	}
}

struct svg_box {
	double x0, y0, x1, y1;
};

static double box_overlap(const struct svg_box *a, const struct svg_box *b)
{
	double w = fmin(a->x1, b->x1) - fmax(a->x0, b->x0), h = fmin(a->y1, b->y1) - fmax(a->y0, b->y0);

	return w > 0 && h > 0 ? w * h : 0;
}

/* How much of a label's box hides others or leaves the plot: what the placement minimizes. */
static double label_cost(const struct svg_box *b, const struct svg_box *taken, int n_taken,
			 const struct svg_box *frame)
{
	double cost = 0, area = (b->x1 - b->x0) * (b->y1 - b->y0);
	int i;

	for (i = 0; i < n_taken; i++)
		cost += box_overlap(b, &taken[i]);
	return cost + 10 * (area - box_overlap(b, frame));
}

/*
 * The label's box next to its point at (px, py): the first of eight directions at growing distances
 * where it overlaps no label or marker placed so far, else the least overlapping. Returns the box;
 * *far says whether it moved past the first ring (a leader line then ties it to its point).
 */
static struct svg_box place_label(double px, double py, double w, const struct svg_box *taken, int n_taken,
				  const struct svg_box *frame, int *far)
{
	static const double dir[8][2] = { { 0.7, -0.7 }, { 1, 0 },  { 0.7, 0.7 }, { -0.7, -0.7 },
					  { -1, 0 },     { -0.7, 0.7 }, { 0, -1 }, { 0, 1 } };
	struct svg_box best = { 0, 0, 0, 0 }, b;
	double best_cost = INFINITY, cost, h = SVG_LABEL_HEIGHT;
	int ring, d;

	for (ring = 0; ring < 8; ring++)
		for (d = 0; d < 8; d++) {
			double dist = 7 + 9 * ring, ax = px + dir[d][0] * dist, ay = py + dir[d][1] * dist;

			b.x0 = dir[d][0] > 0 ? ax : dir[d][0] < 0 ? ax - w : ax - w / 2;
			b.y0 = dir[d][1] < 0 ? ay - h : dir[d][1] > 0 ? ay : ay - h / 2;
			b.x1 = b.x0 + w;
			b.y1 = b.y0 + h;
			cost = label_cost(&b, taken, n_taken, frame);
			if (cost < best_cost) {
				best_cost = cost;
				best = b;
				*far = ring > 0;
			}
			if (cost == 0)
				return best;
		}
	return best;
}

struct svg_layout {
	int width, height, title_lines, n_drawn;
	size_t title_cap, legend_cap;
	struct svg_box frame;
	struct log_axis x, y;
	enum plot_y y_kind;
	int with_legend; /* else a line refers to the legend of the plot above */
	char **entries; /* the legend's text per spec */
	int *on_front;
	double *px, *py; /* where each point is drawn; NAN when it is not */
};

static void layout_free(struct svg_layout *l, int n)
{
	int i;

	for (i = 0; l->entries && i < n; i++)
		free(l->entries[i]);
	free(l->entries);
	free(l->on_front);
	free(l->px);
	free(l->py);
}

/* Spec i's legend entry: the spec, its bytes, compression and error, and where it is drawn. */
static char *legend_entry(const struct ab_result *r, enum plot_y y_kind)
{
	const char *spec = spec_label(r->spec), *name = plot_name(y_kind);
	double x = r->bytes_per_token, y = plot_value(r, y_kind);
	size_t cap = strlen(spec) + 160;
	char *s = malloc(cap), where[48] = "";

	if (!s)
		return NULL;
	if (isnan(x) || isnan(y))
		snprintf(where, sizeof(where), ", not drawn");
	else if (y <= 0 || x <= 0)
		snprintf(where, sizeof(where), ", drawn on the 0 line");
	if (isnan(y))
		snprintf(s, cap, "%s  (%.1f B/token, %.2fx vs fp16, %s n/a%s)", spec, x, r->compression, name, where);
	else
		snprintf(s, cap, "%s  (%.1f B/token, %.2fx vs fp16, %s %.3g%s)", spec, x, r->compression, name, y,
			 where);
	return s;
}

/* The width that fits the title and legend (within the bounds), the lines they take, and the axes. */
static int layout_plot(struct svg_layout *l, const char *title, const struct ab_result *r, int n,
		       enum plot_y y_kind, int with_legend)
{
	double need;
	size_t longest = 0;
	int i, legend_lines = 0, top;

	memset(l, 0, sizeof(*l));
	l->entries = calloc((size_t)n + 1, sizeof(char *));
	l->on_front = calloc((size_t)n + 1, sizeof(int));
	l->px = calloc((size_t)n + 1, sizeof(double));
	l->py = calloc((size_t)n + 1, sizeof(double));
	if (!l->entries || !l->on_front || !l->px || !l->py)
		return -1;
	l->y_kind = y_kind;
	l->with_legend = with_legend;
	front_of(r, n, y_kind, l->on_front);
	for (i = 0; i < n; i++) {
		l->entries[i] = legend_entry(&r[i], y_kind);
		if (!l->entries[i])
			return -1;
		longest = strlen(l->entries[i]) > longest ? strlen(l->entries[i]) : longest;
	}
	need = fmax(SVG_MARGIN + SVG_LEGEND_TEXT + SVG_MONO_CHAR * (double)longest,
		    SVG_MARGIN + SVG_TITLE_CHAR * (double)strlen(title)) + SVG_MARGIN;
	l->width = need < SVG_MIN_WIDTH ? SVG_MIN_WIDTH : need > SVG_MAX_WIDTH ? SVG_MAX_WIDTH : (int)ceil(need);
	l->title_cap = (size_t)((l->width - 2 * SVG_MARGIN) / SVG_TITLE_CHAR);
	l->legend_cap = (size_t)((l->width - 2 * SVG_MARGIN - SVG_LEGEND_TEXT) / SVG_MONO_CHAR);
	l->title_lines = wrap_lines(title, l->title_cap);
	for (i = 0; i < n && with_legend; i++)
		legend_lines += wrap_lines(l->entries[i], l->legend_cap);
	top = SVG_MARGIN + l->title_lines * SVG_TITLE_LINE + 12;
	l->frame = (struct svg_box){ SVG_LEFT, top, l->width - SVG_RIGHT, top + SVG_PLOT_HEIGHT };
	/* axis names, the notes line, then the legend: its first baseline 84 below the plot, its last
	 * (legend_lines - 1) lines and (n - 1) gaps of 4 further, then 4 for descenders */
	l->height = with_legend ? (int)l->frame.y1 + 84 + (legend_lines - 1) * SVG_LEGEND_LINE + (n - 1) * 4 + 4 +
					  SVG_MARGIN
				: (int)l->frame.y1 + 84 + SVG_MARGIN;
	/* px and py hold the values until the axes fit them, then the pixels */
	for (i = 0; i < n; i++) {
		l->px[i] = r[i].bytes_per_token;
		l->py[i] = plot_value(&r[i], y_kind);
	}
	axis_fit(&l->x, l->px, n, 0.4);
	axis_fit(&l->y, l->py, n, y_kind == PLOT_PERPLEXITY ? 0.004 : 0.4);
	l->x.from = l->frame.x0;
	l->x.span = l->frame.x1 - l->frame.x0;
	l->y.from = l->frame.y1;
	l->y.span = l->frame.y0 - l->frame.y1;
	for (i = 0; i < n; i++) {
		int drawn = !isnan(l->px[i]) && !isnan(l->py[i]);

		l->px[i] = drawn ? axis_pos(&l->x, l->px[i]) : NAN;
		l->py[i] = drawn ? axis_pos(&l->y, l->py[i]) : NAN;
		l->n_drawn += drawn;
	}
	return 0;
}

/* The best trade-off curve: through the front's points in order of bytes. */
static void svg_front(FILE *f, const struct svg_layout *l, int n)
{
	double last = -INFINITY;
	int i, k, count = 0;

	for (k = 0; k < n; k++) { /* n is small: a selection in x order */
		int next = -1;

		for (i = 0; i < n; i++)
			if (l->on_front[i] && !isnan(l->px[i]) && l->px[i] > last &&
			    (next < 0 || l->px[i] < l->px[next]))
				next = i;
		if (next < 0)
			break;
		fprintf(f, "%s%.1f,%.1f", count++ ? " " : "<polyline class=\"front\" fill=\"none\" stroke=\"#444\" "
			"stroke-width=\"1.5\" stroke-opacity=\"0.6\" points=\"", l->px[next], l->py[next]);
		last = l->px[next];
	}
	if (count)
		fputs("\"/>\n", f);
}

/* Markers first, so that every label can keep clear of every marker. */
static int svg_points(FILE *f, const struct svg_layout *l, const struct ab_result *r, int n)
{
	struct svg_box *taken = calloc(2 * (size_t)n + 1, sizeof(*taken));
	int i, far = 0, n_taken = 0;
	char label[16];

	if (!taken)
		return -1;
	for (i = 0; i < n; i++) {
		if (isnan(l->px[i]))
			continue;
		fprintf(f, "<g class=\"point\" data-label=\"S%d\" transform=\"translate(%.1f,%.1f)\"><title>S%d: ",
			i + 1, l->px[i], l->py[i], i + 1);
		ab_markup_text(f, spec_label(r[i].spec));
		fputs("</title>", f);
		svg_marker(f, i);
		fputs("</g>\n", f);
		taken[n_taken++] = (struct svg_box){ l->px[i] - 6, l->py[i] - 6, l->px[i] + 6, l->py[i] + 6 };
	}
	for (i = 0; i < n; i++) {
		struct svg_box b;

		if (isnan(l->px[i]))
			continue;
		snprintf(label, sizeof(label), "S%d", i + 1);
		b = place_label(l->px[i], l->py[i], SVG_LABEL_CHAR * (double)strlen(label) + 2, taken, n_taken,
				&l->frame, &far);
		taken[n_taken++] = b;
		if (far)
			fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#999\"/>",
				l->px[i], l->py[i], fmin(fmax(l->px[i], b.x0), b.x1), fmin(fmax(l->py[i], b.y0), b.y1));
		fprintf(f, "<text class=\"label\" data-label=\"%s\" x=\"%.1f\" y=\"%.1f\" font-size=\"11\" "
			"font-weight=\"bold\" font-family=\"monospace\">%s</text>\n", label, b.x0 + 1, b.y1 - 2, label);
	}
	free(taken);
	return 0;
}

static void svg_legend(FILE *f, const struct svg_layout *l, int n)
{
	double y = l->frame.y1 + 60;
	int i, zero = l->x.has_zero || l->y.has_zero;

	fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#444\" stroke-width=\"1.5\" "
		"stroke-opacity=\"0.6\"/><text x=\"%d\" y=\"%.1f\">best trade-off: no other spec has both fewer "
		"bytes and a lower %s.%s%s</text>\n", SVG_MARGIN, y - 4, SVG_MARGIN + 24, y - 4, SVG_MARGIN + 30, y,
		plot_name(l->y_kind), zero ? " Log axes: a value of 0 is drawn on the dashed 0 line." : " Log axes.",
		l->n_drawn < n ? " n/a values are not drawn." : "");
	y += 24;
	if (!l->with_legend) {
		fprintf(f, "<text x=\"%d\" y=\"%.1f\">S1..S%d: the specs of the legend above.</text>\n",
			SVG_MARGIN + 30, y, n);
		return;
	}
	for (i = 0; i < n; i++) {
		fprintf(f, "<g transform=\"translate(%.1f,%.1f)\">", SVG_MARGIN + 6.0, y - 4);
		svg_marker(f, i);
		fprintf(f, "</g><text x=\"%d\" y=\"%.1f\" font-weight=\"bold\" font-family=\"monospace\">S%d</text>",
			SVG_MARGIN + 16, y, i + 1);
		fprintf(f, "<text class=\"legend\" data-label=\"S%d\" font-family=\"monospace\">", i + 1);
		svg_wrapped(f, l->entries[i], l->legend_cap, SVG_MARGIN + SVG_LEGEND_TEXT, y, SVG_LEGEND_LINE);
		fputs("</text>\n", f);
		y += wrap_lines(l->entries[i], l->legend_cap) * SVG_LEGEND_LINE + 4;
	}
}

static const char *axis_name(enum plot_y y)
{
	return y == PLOT_KL ? "mean next-token KL vs the full cache, nats"
	       : y == PLOT_PERPLEXITY ? "perplexity" : "attention output relative error";
}

/* One plot as an <svg> element at (0, top) of the page (nested when top > 0). */
static int svg_draw(FILE *f, const struct svg_layout *l, const char *title, const struct ab_result *r, int n,
		    int top)
{
	int rc;

	if (top)
		fprintf(f, "<svg y=\"%d\" width=\"%d\" height=\"%d\" class=\"ab-plot-%s\">\n", top, l->width,
			l->height, plot_name(l->y_kind));
	fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text font-size=\"14\">");
	svg_wrapped(f, title, l->title_cap, SVG_MARGIN, SVG_MARGIN + 14, SVG_TITLE_LINE);
	fputs("</text>\n", f);
	fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n",
		l->frame.x0, l->frame.y0, l->frame.x1 - l->frame.x0, l->frame.y1 - l->frame.y0);
	svg_ticks(f, &l->x, 0, l->frame.y0, l->frame.y1);
	svg_ticks(f, &l->y, 1, l->frame.x0, l->frame.x1);
	fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">KV bytes per token, all layers and KV heads "
		"(log scale)</text>\n", (l->frame.x0 + l->frame.x1) / 2, l->frame.y1 + 36);
	fprintf(f, "<text transform=\"translate(18,%.1f) rotate(-90)\" text-anchor=\"middle\">%s (log scale)</text>\n",
		(l->frame.y0 + l->frame.y1) / 2, axis_name(l->y_kind));
	svg_front(f, l, n);
	rc = svg_points(f, l, r, n);
	svg_legend(f, l, n);
	if (top)
		fputs("</svg>\n", f);
	return rc;
}

static int any_perplexity(const struct ab_result *r, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (!isnan(r[i].perplexity))
			return 1;
	return 0;
}

/* The second plot's title: the first one names the run. */
#define PERPLEXITY_TITLE "Perplexity against KV bytes per token (the full cache's is in the table)"

int ab_svg_plot(FILE *f, const char *title, const struct ab_result *r, int n)
{
	struct svg_layout first, second;
	int use_kl = 0, rc, i, two = any_perplexity(r, n), width, height;

	for (i = 0; i < n; i++)
		use_kl |= !isnan(r[i].kl_mean);
	memset(&second, 0, sizeof(second));
	rc = layout_plot(&first, title, r, n, use_kl ? PLOT_KL : PLOT_ATTENTION, 1);
	if (!rc && two)
		rc = layout_plot(&second, PERPLEXITY_TITLE, r, n, PLOT_PERPLEXITY, 0);
	if (!rc) {
		width = two && second.width > first.width ? second.width : first.width;
		height = first.height + (two ? second.height : 0);
		fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"ab-plot\" width=\"%d\" height=\"%d\" "
			"viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n", width, height, width,
			height);
		rc = svg_draw(f, &first, title, r, n, 0);
		if (!rc && two)
			rc = svg_draw(f, &second, PERPLEXITY_TITLE, r, n, first.height);
		fputs("</svg>\n", f);
	}
	layout_free(&first, n);
	layout_free(&second, n);
	return rc;
}

int ab_write_svg(const char *path, const char *title, const struct ab_result *r, int n,
		 char message[AB_MESSAGE_MAX])
{
	FILE *f = fopen(path, "w");

	if (!f)
		return report_fail(message, "%s: cannot create: %s", path, strerror(errno));
	if (ab_svg_plot(f, title, r, n)) {
		fclose(f);
		return report_fail(message, "%s: out of memory drawing the plot", path);
	}
	return finish_file(f, path, message);
}
