/*
 * tools/ab_html.c — kvpager-ab's HTML report: one page that needs no network (its style, script and
 * plot are inline), with the results table, sorted by a click on a column's header, and the trade-off
 * plot of ab_svg_plot (with --text, a second plot of perplexity). Every spec and the title are escaped: a spec is user input.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/ab.h"

static const char page_style[] =
	"body{font-family:sans-serif;margin:16px;color:#222}\n"
	"h1{font-size:18px;font-weight:normal;overflow-wrap:anywhere}\n"
	"figure{margin:0 0 16px 0;overflow-x:auto}\n"
	"table{border-collapse:collapse;font-size:13px}\n"
	"th,td{border:1px solid #ccc;padding:3px 6px}\n"
	"th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}\n"
	"th[aria-sort=ascending]::after{content:' \\25B2'}\n"
	"th[aria-sort=descending]::after{content:' \\25BC'}\n"
	"td.num{text-align:right;font-family:monospace;white-space:nowrap}\n"
	"td.spec{font-family:monospace;max-width:40em;overflow-wrap:anywhere}\n"
	"tr.front td.label{font-weight:bold}\n"
	"p.note{font-size:12px;color:#555}\n";

/*
 * Sorting: numbers by value, text by text; n/a (an empty data-v) always last. A page opened with
 * #sort=N starts sorted on column N, which is how the browser test checks the sort. The body's
 * data-report attribute says the script ran to its end.
 */
static const char page_script[] =
	"(function () {\n"
	"  var table = document.getElementById('results');\n"
	"  var heads = table.tHead.rows[0].cells, body = table.tBodies[0];\n"
	"  function key(row, i) {\n"
	"    var c = row.cells[i], v = c.getAttribute('data-v');\n"
	"    return v === null ? c.textContent : v;\n"
	"  }\n"
	"  function sortBy(i) {\n"
	"    var th = heads[i], up = th.getAttribute('aria-sort') !== 'ascending';\n"
	"    var numeric = th.getAttribute('data-type') === 'num';\n"
	"    var rows = Array.prototype.slice.call(body.rows);\n"
	"    for (var h = 0; h < heads.length; h++) heads[h].removeAttribute('aria-sort');\n"
	"    th.setAttribute('aria-sort', up ? 'ascending' : 'descending');\n"
	"    rows.sort(function (a, b) {\n"
	"      var x = key(a, i), y = key(b, i);\n"
	"      if (numeric) {\n"
	"        if (x === '' || y === '') return (x === '') - (y === '');\n"
	"        return up ? x - y : y - x;\n"
	"      }\n"
	"      return up ? x.localeCompare(y) : y.localeCompare(x);\n"
	"    });\n"
	"    rows.forEach(function (r) { body.appendChild(r); });\n"
	"  }\n"
	"  Array.prototype.forEach.call(heads, function (th, i) {\n"
	"    th.addEventListener('click', function () { sortBy(i); });\n"
	"  });\n"
	"  var m = /^#sort=(\\d+)$/.exec(location.hash);\n"
	"  if (m && +m[1] < heads.length) sortBy(+m[1]);\n"
	"  document.body.setAttribute('data-report', 'ready');\n"
	"})();\n";

/* A number cell: shown as fmt, sorted by its full value; n/a sorts last. */
static void number_cell(FILE *f, const char *fmt, double shown, double v)
{
	if (isnan(v)) {
		fputs("<td class=\"num\" data-v=\"\">n/a</td>", f);
		return;
	}
	fprintf(f, "<td class=\"num\" data-v=\"%.9g\">", v);
	fprintf(f, fmt, shown);
	fputs("</td>", f);
}

static void table_head(FILE *f, int use_kl)
{
	static const char *const text_columns[] = { "spec" };
	static const char *const number_columns[] = { "tokens", "bytes/token", "vs fp16", "KL mean", "KL p99",
						      "top-1", "attn err", "attn err max", "tok/s",
						      "perplexity" };
	size_t i;

	fprintf(f, "<table id=\"results\">\n<thead><tr><th data-type=\"num\" title=\"the label in the plot\">"
		"label</th><th data-type=\"text\" title=\"on the best trade-off curve of bytes and %s\">best"
		"</th>", use_kl ? "KL" : "attention error");
	for (i = 0; i < sizeof(text_columns) / sizeof(text_columns[0]); i++)
		fprintf(f, "<th data-type=\"text\">%s</th>", text_columns[i]);
	for (i = 0; i < sizeof(number_columns) / sizeof(number_columns[0]); i++)
		fprintf(f, "<th data-type=\"num\">%s</th>", number_columns[i]);
	fputs("</tr></thead>\n<tbody>\n", f);
}

static void table_row(FILE *f, const struct ab_result *r, int i, int on_front)
{
	fprintf(f, "<tr%s><td class=\"label\" data-v=\"%d\">S%d</td><td>%s</td><td class=\"spec\">",
		on_front ? " class=\"front\"" : "", i + 1, i + 1, on_front ? "yes" : "");
	ab_markup_text(f, r->spec[0] ? r->spec : "\"\" (default)");
	fputs("</td>", f);
	number_cell(f, "%.0f", (double)r->tokens, (double)r->tokens);
	number_cell(f, "%.1f", r->bytes_per_token, r->bytes_per_token);
	number_cell(f, "%.2fx", r->compression, r->compression);
	number_cell(f, "%.2e", r->kl_mean, r->kl_mean);
	number_cell(f, "%.2e", r->kl_p99, r->kl_p99);
	number_cell(f, "%.2f%%", 100.0 * r->top1, r->top1);
	number_cell(f, "%.2e", r->attention_error, r->attention_error);
	number_cell(f, "%.2e", r->attention_error_max, r->attention_error_max);
	number_cell(f, "%.0f", r->tokens_per_s, r->tokens_per_s);
	number_cell(f, "%.4f", r->perplexity, r->perplexity); /* --text only */
	fputs("</tr>\n", f);
}

static int html_fail(char message[AB_MESSAGE_MAX], const char *path, const char *what)
{
	snprintf(message, AB_MESSAGE_MAX, "%s: %s: %s", path, what, strerror(errno));
	return -1;
}

int ab_write_html(const char *path, const char *title, const struct ab_result *r, int n,
		  char message[AB_MESSAGE_MAX])
{
	int *on_front = calloc((size_t)n + 1, sizeof(int)), use_kl, i, bad;
	FILE *f;

	if (!on_front)
		return html_fail(message, path, "out of memory");
	use_kl = ab_pareto(r, n, on_front);
	f = fopen(path, "w");
	if (!f) {
		free(on_front);
		return html_fail(message, path, "cannot create");
	}
	fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>", f);
	ab_markup_text(f, title);
	fprintf(f, "</title>\n<style>\n%s</style>\n</head>\n<body>\n<h1>", page_style);
	ab_markup_text(f, title);
	fputs("</h1>\n<figure>\n", f);
	bad = ab_svg_plot(f, title, r, n);
	fputs("</figure>\n<p class=\"note\">Click a column's header to sort by it (again to reverse); n/a sorts "
	      "last. Bold labels are on the best trade-off curve.</p>\n", f);
	table_head(f, use_kl);
	for (i = 0; i < n; i++)
		table_row(f, &r[i], i, on_front[i]);
	fprintf(f, "</tbody>\n</table>\n<script>\n%s</script>\n</body>\n</html>\n", page_script);
	free(on_front);
	bad |= ferror(f);
	if (fclose(f) != 0 || bad)
		return html_fail(message, path, bad < 0 ? "out of memory drawing the plot" : "write failed");
	return 0;
}
