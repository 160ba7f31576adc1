/*
 * tools/ab_report.c — what kvpager-ab shows: the table, the CSV, the SVG plot of memory against
 * fidelity, and the progress bar.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tools/ab.h"

#define PROGRESS_WIDTH 30

double ab_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- progress ---- */

void ab_progress_start(struct ab_progress *p, uint64_t total, int allowed)
{
	memset(p, 0, sizeof(*p));
	p->enabled = allowed && isatty(STDERR_FILENO);
	p->total = total ? total : 1;
	p->start = ab_now();
}

void ab_progress_advance(struct ab_progress *p, uint64_t n, const char *label)
{
	double now, share;
	int filled, i;
	char bar[PROGRESS_WIDTH + 1];

	if (!p)
		return;
	p->done += n;
	if (!p->enabled)
		return;
	now = ab_now();
	/* nothing for short runs, and at most ten redraws a second */
	if (now - p->start < 1.0 || now - p->last_draw < 0.1)
		return;
	p->last_draw = now;
	share = p->done >= p->total ? 1.0 : (double)p->done / (double)p->total;
	filled = (int)(share * PROGRESS_WIDTH);
	for (i = 0; i < PROGRESS_WIDTH; i++)
		bar[i] = i < filled ? '#' : '.';
	bar[PROGRESS_WIDTH] = '\0';
	fprintf(stderr, "\r[%s] %3.0f%% %.40s\033[K", bar, 100.0 * share, label ? label : "");
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

void ab_print_table(FILE *f, const char *title, const struct ab_result *r, int n)
{
	int width = 4, i, w;

	for (i = 0; i < n; i++) {
		w = (int)strlen(spec_label(r[i].spec));
		width = w > width ? w : width;
	}
	fprintf(f, "%s\n", title);
	fprintf(f, "%-*s %11s %8s %9s %8s %9s %9s %8s %9s %9s\n", width, "spec", "bytes/tok", "final",
		"peak KiB", "vs fp16", "KL mean", "KL p99", "top-1", "attn err", "tok/s");
	for (i = 0; i < n; i++) {
		fprintf(f, "%-*s", width, spec_label(r[i].spec));
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
		fputc('\n', f);
	}
	fputs("bytes/tok: the run's mean (bytes held after each position, summed, over the positions summed); "
	      "final: held at the end per token; peak: the most held at once; vs fp16: on the mean\n", f);
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
	      "bytes_peak,bytes_compressed_peak,cold_tier,cold_tier_used\n", f);
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
			fprintf(f, ",%d\n", r[i].cold_tier_used);
		else
			fputs(",\n", f);
	}
	return finish_file(f, path, message);
}

/* ---- SVG ---- */

#define SVG_WIDTH 720
#define SVG_PLOT_HEIGHT 400
#define SVG_LEFT 90
#define SVG_RIGHT 30
#define SVG_TOP 50
#define SVG_BOTTOM 60
#define SVG_LEGEND_LINE 18

static const char *const svg_colors[] = { "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
					  "#9467bd", "#8c564b", "#e377c2", "#17becf" };

static void svg_text(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '<')
			fputs("&lt;", f);
		else if (*s == '>')
			fputs("&gt;", f);
		else if (*s == '&')
			fputs("&amp;", f);
		else if (*s == '"')
			fputs("&quot;", f);
		else
			fputc(*s, f);
	}
}

/* A tick step of 1, 2 or 5 times a power of ten giving about five ticks over [0, max]. */
static double tick_step(double max)
{
	double raw = max / 5, unit = pow(10, floor(log10(raw)));

	return raw <= unit ? unit : raw <= 2 * unit ? 2 * unit : raw <= 5 * unit ? 5 * unit : 10 * unit;
}

/* The axis range: a little above the largest value, and 1 when everything is 0. */
static double axis_max(double max)
{
	return max > 0 && isfinite(max) ? max * 1.12 : 1.0;
}

struct svg_axes {
	double x_max, y_max;
	int plot_w, plot_h;
};

static double svg_x(const struct svg_axes *a, double v)
{
	return SVG_LEFT + v / a->x_max * a->plot_w;
}

static double svg_y(const struct svg_axes *a, double v)
{
	return SVG_TOP + a->plot_h - v / a->y_max * a->plot_h;
}

static void svg_grid(FILE *f, const struct svg_axes *a, const char *x_label, const char *y_label)
{
	double step, v;

	fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#333\"/>\n",
		SVG_LEFT, SVG_TOP, a->plot_w, a->plot_h);
	step = tick_step(a->x_max);
	for (v = 0; v <= a->x_max * (1 + 1e-9); v += step)
		fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>"
			"<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%g</text>\n",
			svg_x(a, v), SVG_TOP, svg_x(a, v), SVG_TOP + a->plot_h, svg_x(a, v),
			SVG_TOP + a->plot_h + 18, v);
	step = tick_step(a->y_max);
	for (v = 0; v <= a->y_max * (1 + 1e-9); v += step)
		fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/>"
			"<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n",
			SVG_LEFT, svg_y(a, v), SVG_LEFT + a->plot_w, svg_y(a, v), SVG_LEFT - 6, svg_y(a, v) + 4, v);
	fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", SVG_LEFT + a->plot_w / 2,
		SVG_TOP + a->plot_h + 40, x_label);
	fprintf(f, "<text transform=\"translate(20,%d) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
		SVG_TOP + a->plot_h / 2, y_label);
}

/* Each spec is a numbered dot; the legend under the plot maps numbers to specs. */
static void svg_points(FILE *f, const struct svg_axes *a, const struct ab_result *r, int n, int use_kl)
{
	int i, legend_y = SVG_TOP + a->plot_h + SVG_BOTTOM;

	for (i = 0; i < n; i++) {
		double y = use_kl ? r[i].kl_mean : r[i].attention_error;
		const char *color = svg_colors[i % (int)(sizeof(svg_colors) / sizeof(svg_colors[0]))];

		if (isnan(y))
			continue;
		fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"6\" fill=\"%s\"/>"
			"<text x=\"%.1f\" y=\"%.1f\">%d</text>\n",
			svg_x(a, r[i].bytes_per_token), svg_y(a, y), color, svg_x(a, r[i].bytes_per_token) + 8,
			svg_y(a, y) - 8, i + 1);
		fprintf(f, "<circle cx=\"%d\" cy=\"%d\" r=\"5\" fill=\"%s\"/><text x=\"%d\" y=\"%d\">%d: ",
			SVG_LEFT + 6, legend_y + i * SVG_LEGEND_LINE - 4, color, SVG_LEFT + 16,
			legend_y + i * SVG_LEGEND_LINE, i + 1);
		svg_text(f, spec_label(r[i].spec));
		fprintf(f, " (%.2fx vs fp16)</text>\n", r[i].compression);
	}
}

int ab_write_svg(const char *path, const char *title, const struct ab_result *r, int n,
		 char message[AB_MESSAGE_MAX])
{
	struct svg_axes a = { 0, 0, SVG_WIDTH - SVG_LEFT - SVG_RIGHT, SVG_PLOT_HEIGHT - SVG_TOP - SVG_BOTTOM };
	int i, use_kl = 0, height = SVG_PLOT_HEIGHT + 20 + n * SVG_LEGEND_LINE;
	FILE *f;

	for (i = 0; i < n; i++)
		use_kl |= !isnan(r[i].kl_mean);
	for (i = 0; i < n; i++) {
		double y = use_kl ? r[i].kl_mean : r[i].attention_error;

		a.x_max = r[i].bytes_per_token > a.x_max ? r[i].bytes_per_token : a.x_max;
		a.y_max = !isnan(y) && y > a.y_max ? y : a.y_max;
	}
	a.x_max = axis_max(a.x_max);
	a.y_max = axis_max(a.y_max);
	f = fopen(path, "w");
	if (!f)
		return report_fail(message, "%s: cannot create: %s", path, strerror(errno));
	fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
		"font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
		SVG_WIDTH, height);
	fprintf(f, "<text x=\"%d\" y=\"24\" font-size=\"14\">", SVG_LEFT);
	svg_text(f, title);
	fputs("</text>\n", f);
	svg_grid(f, &a, "KV bytes per token (all layers and KV heads)",
		 use_kl ? "mean next-token KL vs the full cache (nats)" : "attention output relative error");
	svg_points(f, &a, r, n, use_kl);
	fputs("</svg>\n", f);
	return finish_file(f, path, message);
}
