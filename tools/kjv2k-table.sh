#!/bin/sh
# tools/kjv2k-table.sh — README's long-context table: kjv-2k at its 2048-token context, perplexity over
# kjv-heldout.txt as llama-perplexity computes it (kvpager-ab --text), for StreamingLLM, H2O and
# TriAttention, each alone and stacked with 3-bit and 2-bit TurboQuant, at budgets of 1/2, 1/4, 1/8 and
# 1/16 of the context; then a few more stacked specs, and the best spec found at >= 8x, 16x and 32x
# less memory than dense fp16 (the lowest KL at or above the ratio, both runs together).
#
#   tools/kjv2k-table.sh [OUTDIR]     (default build/kjv2k-table)
#
# Writes OUTDIR/sweep.csv and OUTDIR/extra.csv (kvpager-ab's CSV: every spec in full), their printed
# tables (sweep.txt, extra.txt), and prints the markdown table on stdout. 56 specs x 8 chunks x about
# 2.5 s on one core: about 19 minutes of CPU, run under nice.
# Environment: BUILD (default build), KVP_MODELS (default ../shared/models), CHUNKS (default 8),
# RUN (default "sweep extra": the runs to make; RUN= makes none: the table is drawn from the files in
# OUTDIR either way).
set -eu

build=${BUILD:-build}
models=${KVP_MODELS:-../shared/models}
chunks=${CHUNKS:-8}
run=${RUN-sweep extra}
out=${1:-$build/kjv2k-table}
ctx=2048

# The tenant part every spec shares: 16-token blocks and hot window, so that even a 128-token budget
# leaves room for a cold block (sinks + window + block = 36); exact tiers in fp16, as the baseline.
base="block=16,sinks=4,window=16,store=fp16"
tq3="k=turboquant(bits=3),v=turboquant(bits=3)"
tq2="k=turboquant(bits=2),v=turboquant(bits=2)"

mkdir -p "$out"

# One line per spec of the sweep: "name|budget|codec|spec", in the order of the run.
sweep_specs() {
	echo "dense fp16|all|-|$base"
	for budget in 1024 512 256 128; do
		frac=$(awk "BEGIN { print $budget / $ctx / 2 }")
		share="1/$((ctx / budget)) ($budget)"
		for codec in - tq3 tq2; do
			case $codec in
			-) c="" ;;
			tq3) c=",$tq3" ;;
			tq2) c=",$tq2" ;;
			esac
			echo "StreamingLLM|$share|$codec|$base,policy=streaming(sinks=4,window=$((budget - 4)))$c"
			# H2O's budget is a share of the tokens seen so far: at the context's end it keeps $budget
			echo "H2O|$share|$codec|$base,policy=h2o(heavy=$frac,recent=$frac)$c"
			# a round every 16 tokens: a stream holds at most budget + 16
			echo "TriAttention|$share|$codec|$base,policy=triattention(budget=$budget,every=16)$c"
		done
	done
}

# More stacked specs, looking for the lowest KL at each ratio: other blocks and windows, 2-bit keys
# with 3-bit values.
extra_specs() {
	k2v3="k=turboquant(bits=2),v=turboquant(bits=3)"
	b64="block=64,sinks=4,window=64,store=fp16"
	for budget in 512 256 128; do
		frac=$(awk "BEGIN { print $budget / $ctx / 2 }")
		share="1/$((ctx / budget)) ($budget)"
		echo "StreamingLLM|$share|k2v3|$base,policy=streaming(sinks=4,window=$((budget - 4))),$k2v3"
		echo "H2O|$share|k2v3|$base,policy=h2o(heavy=$frac,recent=$frac),$k2v3"
		echo "TriAttention|$share|k2v3|$base,policy=triattention(budget=$budget,every=16),$k2v3"
	done
	# 64-token blocks: less metadata per token; sinks + window + block = 132 needs a budget above it
	for budget in 512 256; do
		share="1/$((ctx / budget)) ($budget)"
		echo "StreamingLLM|$share|tq3 b64|$b64,policy=streaming(sinks=4,window=$((budget - 4))),$tq3"
		echo "TriAttention|$share|tq3 b64|$b64,policy=triattention(budget=$budget,every=16),$tq3"
	done
	# no hot window (only the partial last block stays exact), 2-bit: the most compression
	w0="block=16,sinks=4,window=0,store=fp16"
	for budget in 128 64; do
		frac=$(awk "BEGIN { print $budget / $ctx / 2 }")
		share="1/$((ctx / budget)) ($budget)"
		echo "StreamingLLM|$share|tq2 w0|$w0,policy=streaming(sinks=4,window=$((budget - 4))),$tq2"
		echo "H2O|$share|tq2 w0|$w0,policy=h2o(heavy=$frac,recent=$frac),$tq2"
		echo "TriAttention|$share|tq2 w0|$w0,policy=triattention(budget=$budget,every=16),$tq2"
	done
}

# kvpager-ab over the specs of one list into OUTDIR/NAME.csv and NAME.txt.
run_list() {
	name=$1
	set --
	while IFS='|' read -r _ _ _ spec; do
		set -- "$@" --spec "$spec"
	done <"$out/$name.specs"
	nice "$build/kvpager-ab" --quiet --model "$models/kjv-2k.bin" --text "$models/kjv-heldout.txt" \
		--chunks "$chunks" --csv "$out/$name.csv" "$@" >"$out/$name.txt"
}

sweep_specs >"$out/sweep.specs"
extra_specs >"$out/extra.specs"
for name in $run; do
	run_list "$name"
done

# The markdown table: the specs' lines and the CSV rows in the same order. The CSV's spec is quoted
# and has commas; the numbers follow it.
render() {
	awk -F'|' -v ctx="$ctx" '
	function row(line,   m, rest, f) {
		m = match(line, /^"([^"]|"")*",/)
		rest = substr(line, RLENGTH + 1)
		split(rest, f, ",")
		# tokens, bytes/token mean, vs fp16 mean, KL mean, KL p99, top-1, ... perplexity (the 21st)
		bytes = f[2]; ratio = f[3]; kl = f[4]; top1 = f[6]; ppl = f[21]
	}
	FILENAME ~ /\.specs$/ {
		n++; name[n] = $1; budget[n] = $2; codec[n] = $3; spec[n] = $4
		extra[n] = FILENAME ~ /extra\.specs$/
		next
	}
	FILENAME ~ /\.txt$/ && /^full / { split($0, w, " "); full = w[2]; next }
	FILENAME ~ /\.csv$/ && FNR > 1 {
		row($0); k++
		p[k] = ppl; klv[k] = kl; t1[k] = top1; b[k] = bytes; r[k] = ratio
	}
	END {
		printf "Full cache (dense fp32 attention, the reference): perplexity %.4f.\n\n", full
		print "| policy | budget | codec | perplexity | KL | top-1 | bytes/token (mean) | vs dense fp16 |"
		print "|---|---|---|---:|---:|---:|---:|---:|"
		for (i = 1; i <= k && i <= n; i++) {
			if (extra[i] && !extra[i - 1]) {
				print ""
				print "More stacked specs (k2v3: 2-bit keys, 3-bit values; b64: block=64,window=64; w0: window=0, only the partial last block exact):"
				print ""
				print "| policy | budget | codec | perplexity | KL | top-1 | bytes/token (mean) | vs dense fp16 |"
				print "|---|---|---|---:|---:|---:|---:|---:|"
			}
			printf "| %s | %s | %s | %.4f | %.2e | %.2f%% | %.1f | %.2fx |\n", name[i], budget[i],
				codec[i], p[i], klv[i], 100 * t1[i], b[i], r[i]
		}
		print ""
		print "| at least | best spec found (lowest KL) | perplexity | KL | top-1 | bytes/token | vs dense fp16 |"
		print "|---|---|---:|---:|---:|---:|---:|"
		split("8 16 32", goals, " ")
		for (g = 1; g <= 3; g++) {
			best = 0
			for (i = 1; i <= k && i <= n; i++)
				if (r[i] >= goals[g] && (!best || klv[i] < klv[best]))
					best = i
			if (best)
				printf "| %dx | `%s` | %.4f | %.2e | %.2f%% | %.1f | %.2fx |\n", goals[g], spec[best],
					p[best], klv[best], 100 * t1[best], b[best], r[best]
			else
				printf "| %dx | none of these specs | | | | | |\n", goals[g]
		}
	}' "$@"
}

files=""
for name in sweep extra; do
	[ -f "$out/$name.csv" ] && files="$files $out/$name.specs $out/$name.csv"
done
# the full cache's perplexity, from a printed table (every run has the same reference)
for name in sweep extra; do
	[ -s "$out/$name.txt" ] && files="$out/$name.txt $files" && break
done
# shellcheck disable=SC2086 # the paths are ours, without spaces unless OUTDIR has them
render $files
