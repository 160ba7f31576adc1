#!/bin/sh
# Runs each test binary on its own and closes with one line counting every test of every suite:
# "N passed, N failed". Criterion prints "Synthesis: Tested: T | Passing: P | Failing: F | Crashing: C";
# the plain programs print their own "N passed, N failed" line. A binary that dies without its summary
# counts as one failure. kernels_check also counts the values its tests compare, "K comparisons: N passed,
# N failed"; those are summed on a line of their own, above the tests' line, never into it. Criterion's
# Failing already counts the crashed tests. Above the counts, each binary that failed is named again with
# the lines that say why (Criterion's "[----]" and "[FAIL]" lines, the plain programs' "FAIL" lines, a hung
# child's stack; the last lines of one that died without its summary), so the end of a long log tells.
passed=0
failures=""
failed=0
compared_passed=0
compared_failed=0
status=0
for t in "$@"; do
	out=$("$t" 2>&1)
	rc=$?
	printf '%s\n' "$out"
	why=$(printf '%s\n' "$out" | grep -E '^\[----\] .*(Assertion|signal|Timed)|^\[----\]   |^\[FAIL\]|FAIL |waited|\(\+0x[0-9a-f]+\)\[0x')
	line=$(printf '%s\n' "$out" | grep -E 'Synthesis: Tested:|^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
	compared=$(printf '%s\n' "$out" | grep -E '^[0-9]+ comparisons: [0-9]+ passed, [0-9]+ failed' | tail -n 1)
	if [ -n "$compared" ]; then
		compared_passed=$((compared_passed + $(printf '%s' "$compared" | sed -E 's/.*: ([0-9]+) passed.*/\1/')))
		compared_failed=$((compared_failed + $(printf '%s' "$compared" | sed -E 's/.* ([0-9]+) failed.*/\1/')))
	fi
	if [ -z "$line" ]; then
		echo "$t: exited $rc without a summary"
		failures="${failures}${t}: exited $rc without a summary
${why}
$(printf '%s\n' "$out" | tail -n 5)
"
		failed=$((failed + 1))
		status=1
		continue
	fi
	case "$line" in
	*Synthesis*)
		p=$(printf '%s' "$line" | sed -E 's/.*Passing: ([0-9]+).*/\1/')
		f=$(printf '%s' "$line" | sed -E 's/.*Failing: ([0-9]+).*/\1/')
		;;
	*)
		p=$(printf '%s' "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
		f=$(printf '%s' "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/') ;;
	esac
	passed=$((passed + p))
	failed=$((failed + f))
	[ "$rc" -eq 0 ] && [ "$f" -eq 0 ] && continue
	status=1
	failures="${failures}${t} (exit ${rc}):
${why}
"
done
[ -z "$failures" ] || printf 'what failed:\n%s' "$failures"
[ $((compared_passed + compared_failed)) -eq 0 ] ||
	echo "comparisons: ${compared_passed} passed, ${compared_failed} failed"
echo "${passed} passed, ${failed} failed"
exit $status
