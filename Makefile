# kvpager — one build for the library, tools, tests and benchmarks.
#   make            shared + static library, tools, tests, benchmarks (built, not run); first jemalloc
#                   from third_party/ (tools/jemalloc.sh fetch puts it there; tools/setup.sh does it all)
#   make test       every Criterion suite, the ASan+UBSan build's suites, and (on x86-64 with the
#                   cross compiler present) the NEON kernels under qemu-aarch64
#   make bench      build and run the benchmarks
#   make asan       tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make neon       the kernels suite (tests/kernels_check.c), cross-built and run under qemu-aarch64
#   make stack      fails if a stack frame of the library is over 16 KiB (gcc -fstack-usage)
#   make tsan       the multi-thread stresses under ThreadSanitizer
#   make fuzz       libFuzzer targets (clang), each for FUZZ_SECONDS (default 30)
#   make install    PREFIX=/usr/local DESTDIR=
#   CC=clang make   builds with clang

CC       ?= cc
PREFIX   ?= /usr/local
DESTDIR  ?=
BUILD    ?= build
VERSION  := 1.0.0
SOMAJOR  := 1

ARCH     := $(shell $(CC) -dumpmachine | cut -d- -f1)
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
CFLAGS   ?= -O2 -g
# jemalloc is a private copy inside the library (pager/arena.c says why), built once from the tarball
# that tools/jemalloc.sh fetch put in third_party/, and shared by every BUILD (the sanitizer builds too).
JE_DIR   := build/jemalloc
JE_LIB   := $(JE_DIR)/lib/libjemalloc_pic.a
JE_CC    ?= cc
# -ffp-contract=off: a product and a sum are never fused unless written as an FMA, so every kernel table and
# its scalar reference round the same steps (clang fuses within an expression by default, gcc in GNU modes)
override CFLAGS += -std=c11 -D_GNU_SOURCE -fPIC -fvisibility=hidden -ffp-contract=off $(WARN) -Iinclude -I. -I$(JE_DIR)/include
LIB_LIBS := -lnuma -luring -lhiredis -lpthread -lm -ldl
LIBS     := $(LIB_LIBS)
TESTLIBS := -lcriterion

LAYERS   := base kernels codecs policies gating tier pager plugin
ALL_SRC  := $(foreach d,$(LAYERS),$(wildcard $(d)/*.c))
LIB_SRC  := $(ALL_SRC)
ifeq ($(ARCH),x86_64)
LIB_SRC  := $(filter-out %neon.c,$(LIB_SRC))
else ifeq ($(ARCH),aarch64)
LIB_SRC  := $(filter-out %avx2.c %avx512.c,$(LIB_SRC))
else
LIB_SRC  := $(filter-out %neon.c %avx2.c %avx512.c,$(LIB_SRC))
endif
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)

TOOL_MAIN := $(wildcard tools/kvpager-*.c)
TOOL_LIB  := $(filter-out $(TOOL_MAIN),$(wildcard tools/*.c))
TOOL_OBJ  := $(TOOL_LIB:%.c=$(BUILD)/obj/%.o)
TOOLS     := $(TOOL_MAIN:tools/%.c=$(BUILD)/%)

TEST_SRC  := $(wildcard tests/test_*.c)
TESTS     := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(filter-out bench/harness.c,$(wildcard bench/*.c))
BENCHES   := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

SONAME    := libkvpager.so.$(SOMAJOR)
SHARED    := $(BUILD)/$(SONAME)
STATIC    := $(BUILD)/libkvpager.a

.PHONY: all lib tools tests benches suites test check bench asan tsan fuzz neon stack valgrind install clean
all: lib tools tests benches $(BUILD)/kvpager.pc
lib: $(SHARED) $(STATIC)
tools: $(TOOLS)
tests: $(TESTS) $(BUILD)/tests/kernels_check $(BUILD)/tests/policy_stress_check
benches: $(BENCHES)

$(BUILD)/obj/%avx2.o: %avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -mavx2 -mfma -mf16c -MMD -MP -c $< -o $@

$(BUILD)/obj/%avx512.o: %avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vbmi -mavx512vbmi2 -mavx512vnni -mbmi2 -mfma -mf16c -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(JE_LIB): tools/jemalloc.sh third_party/jemalloc.sha256 $(wildcard third_party/jemalloc_*.orig.tar.bz2)
	JE_CC=$(JE_CC) tools/jemalloc.sh build $(JE_DIR)

# Objects that include jemalloc.h wait for the build that generates it. Named as targets here, the objects
# are not intermediates either, which make would delete after each build and compile again the next time.
$(LIB_OBJ) $(TOOL_OBJ): | $(JE_LIB)

# jemalloc's symbols stay inside: hidden, and local by --exclude-libs; nm -D shows only kvp_*.
# nodelete: jemalloc's per-thread destructor must outlive a dlclose, for threads that exit later.
$(SHARED): $(LIB_OBJ) $(JE_LIB) plugin/kvpager.map
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=plugin/kvpager.map -Wl,-z,defs \
		-Wl,--exclude-libs,ALL -Wl,-z,nodelete $(CFLAGS) -o $@ $(LIB_OBJ) $(JE_LIB) $(LIB_LIBS)
	ln -sf $(SONAME) $(BUILD)/libkvpager.so

# The static library carries jemalloc's objects too, so whatever links it needs nothing more.
$(STATIC): $(LIB_OBJ) $(JE_LIB)
	rm -f $@
	ar rcs $@ $(LIB_OBJ) $(JE_DIR)/src/*.pic.o

$(BUILD)/%: tools/%.c $(TOOL_OBJ) $(STATIC)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(TOOL_OBJ) $(STATIC) $(LIBS)

$(BUILD)/tests/%: tests/%.c $(TOOL_OBJ) $(STATIC) | $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(TOOL_OBJ) $(STATIC) $(TESTLIBS) $(LIBS)

# The plugin test is a dlopen host with nothing of the library or of jemalloc linked in (tests/test_plugin.c).
$(BUILD)/tests/test_plugin: tests/test_plugin.c | $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(TESTLIBS) -lpthread -lm -ldl

# The kernels suite, a plain program rather than Criterion, so the same source also runs under qemu-user
# (make neon).
$(BUILD)/tests/kernels_check: tests/kernels_check.c $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(STATIC) $(LIBS)

$(BUILD)/tests/stress_check: tests/stress_check.c $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(STATIC) $(LIBS)

# Policy rounds under other threads' memory pressure, a plain program for the same reason.
$(BUILD)/tests/policy_stress_check: tests/policy_stress_check.c $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -o $@ $< $(STATIC) $(LIBS)

$(BUILD)/bench/%: bench/%.c bench/harness.c bench/harness.h $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< bench/harness.c $(STATIC) $(LIBS)

# The prefix benchmark runs the reference engine (tools/llama.c) for its model rows.
$(BUILD)/bench/bench_prefix: bench/bench_prefix.c bench/harness.c bench/harness.h $(TOOL_OBJ) $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< bench/harness.c $(TOOL_OBJ) $(STATIC) $(LIBS)

$(BUILD)/kvpager.pc: Makefile
	@mkdir -p $(dir $@)
	printf 'prefix=%s\nlibdir=$${prefix}/lib\nincludedir=$${prefix}/include\n\nName: kvpager\nDescription: paged, compressed KV cache for transformer inference\nVersion: %s\nLibs: -L$${libdir} -lkvpager\nLibs.private: %s\nCflags: -I$${includedir}\n' \
		'$(PREFIX)' '$(VERSION)' '$(LIB_LIBS)' > $@

# Each suite binary runs on its own so one crash cannot hide the others; run.sh closes with one line
# counting every test: "N passed, N failed", after one counting the kernel suite's compared values.
suites: all
	@KVP_TEST_BUILD=$(BUILD) sh tests/run.sh $(TESTS) $(BUILD)/tests/kernels_check $(BUILD)/tests/policy_stress_check

test:
	$(MAKE) --no-print-directory suites
	$(MAKE) --no-print-directory pytest
	$(MAKE) --no-print-directory valgrind
	$(MAKE) --no-print-directory asan
	@if [ "$(ARCH)" = x86_64 ] && command -v aarch64-linux-gnu-gcc >/dev/null; then \
		$(MAKE) --no-print-directory neon; \
	else echo "neon: skipped (needs x86-64 with aarch64-linux-gnu-gcc and qemu-aarch64)"; fi
check: test

# The Python binding's suites (python/tests) against this build's library, with Debian's python3-numpy
# and python3-pytest; skipped with a message where those are missing. Any non-zero pytest status fails,
# 5 (nothing collected) too. PYTEST_ARGS goes to pytest: `make pytest PYTEST_ARGS="-k fork"`.
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
.PHONY: pytest
pytest: $(SHARED) $(BUILD)/kvpager-llama
	@if ! $(PYTHON) -c 'import numpy, pytest' 2>/dev/null; then \
		echo "pytest: skipped ($(PYTHON) lacks numpy or pytest: apt-get install python3-numpy python3-pytest)"; \
	else \
		KVPAGER_LIB=$(abspath $(SHARED)) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest -q -p no:cacheprovider \
			$(PYTEST_ARGS) python/tests; \
	fi

# The plugin test under valgrind: a dlopen host must see no invalid access and no leak from the library.
# Criterion does not fail a test whose worker valgrind found errors in, so any report in the log fails it.
valgrind: all
	@KVP_TEST_BUILD=$(BUILD) valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
		--trace-children=yes --trace-children-skip='*/sh,*/nm,*/env,*/readelf' $(BUILD)/tests/test_plugin --jobs 1 \
		> $(BUILD)/valgrind.log 2>&1; rc=$$?; cat $(BUILD)/valgrind.log; \
	if [ $$rc -ne 0 ] || grep -q '^==[0-9]*==' $(BUILD)/valgrind.log; then \
		echo "valgrind: errors in the plugin test (above)"; exit 1; fi

bench: benches
	@for b in $(BENCHES); do echo "== $$b"; $$b || exit 1; done

asan:
	$(MAKE) --no-print-directory BUILD=build-asan \
		CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" \
		tests
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 KVP_TEST_BUILD=build-asan \
		sh tests/run.sh $(TESTS:$(BUILD)/%=build-asan/%) build-asan/tests/kernels_check \
		build-asan/tests/policy_stress_check

# The multi-thread stresses under ThreadSanitizer, as plain programs: Criterion cannot start under TSan.
TSAN_TESTS := build-tsan/tests/stress_check build-tsan/tests/policy_stress_check
tsan:
	$(MAKE) --no-print-directory BUILD=build-tsan \
		CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=thread" $(TSAN_TESTS)
	@TSAN_OPTIONS=halt_on_error=1 KVP_TEST_BUILD=build-tsan sh tests/run.sh $(TSAN_TESTS)

# libFuzzer targets: the library built with coverage and sanitizers, each target run for a bounded time.
FUZZ_SECONDS ?= 30
# Each target starts from its seed corpus, FUZZ_CORPUS/<target> (files the library made, committed; `make
# fuzz-seeds` writes them again); FUZZ_CORPUS= runs without seeds. What a run finds goes to
# build-fuzz/<target>.corpus, emptied first, never into the committed seeds.
FUZZ_TARGETS := $(patsubst tests/%.c,build-fuzz/%,$(wildcard tests/fuzz_*.c))
FUZZ_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined
FUZZ_CORPUS ?= tests/corpus
.PHONY: fuzz-seeds
fuzz:
	$(MAKE) --no-print-directory CC=clang BUILD=build-fuzz CFLAGS="$(FUZZ_FLAGS) -fsanitize=fuzzer-no-link" build-fuzz/libkvpager.a
	@for t in $(FUZZ_TARGETS); do \
		name=$${t#build-fuzz/}; \
		clang -std=c11 -D_GNU_SOURCE $(WARN) -Iinclude -I. $(FUZZ_FLAGS) -fsanitize=fuzzer -o $$t \
			tests/$$name.c build-fuzz/libkvpager.a $(LIBS) || exit 1; \
		rm -rf $$t.corpus; mkdir -p $$t.corpus; \
		seeds=$(if $(FUZZ_CORPUS),$(FUZZ_CORPUS)/$$name); \
		echo "== $$t for $(FUZZ_SECONDS) s, seeds: $${seeds:-none}"; \
		$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $$t.corpus $$seeds > $$t.log 2>&1; rc=$$?; \
		grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' $$t.log; tail -n 12 $$t.log; \
		[ $$rc -eq 0 ] || { echo "$$t: a finding, see $$t.log"; exit 1; }; \
	done

$(BUILD)/tests/seed_corpus: tests/seed_corpus.c tests/fuzz_slot_stub.h $(STATIC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(STATIC) $(LIBS)

fuzz-seeds: $(BUILD)/tests/seed_corpus
	mkdir -p $(FUZZ_TARGETS:build-fuzz/%=tests/corpus/%)
	$(BUILD)/tests/seed_corpus tests/corpus

# The kernels layer and the one below it, with the aarch64 kernels in place of the x86-64 ones: once on a
# CPU with the dot product (both NEON tables run), once on one without (neon-dotprod must not be chosen).
NEON_SRC := $(filter-out %avx2.c %avx512.c,$(filter base/% kernels/%,$(ALL_SRC)))
neon: build-neon/kernels_check
	qemu-aarch64 -cpu max build-neon/kernels_check
	qemu-aarch64 -cpu cortex-a53 build-neon/kernels_check

# Built again only when a source or a header it could include changed (gcc -MMD writes one .d for a
# link of many sources).
build-neon/kernels_check: tests/kernels_check.c $(NEON_SRC) $(wildcard include/*.h base/*.h kernels/*.h)
	@mkdir -p $(dir $@)
	aarch64-linux-gnu-gcc -O2 -static -std=c11 -D_GNU_SOURCE -ffp-contract=off $(WARN) -Iinclude -I. \
		-o $@ tests/kernels_check.c $(NEON_SRC) -lm

# A host thread may have a small stack (musl gives 128 KiB), so no frame of the library may take more than
# STACK_LIMIT bytes: the library's objects are built with -fstack-usage into build-stack/, the largest
# frames are listed, and a frame over the limit, or of a size only known at run time, fails.
STACK_LIMIT ?= 16384
STACK_USAGE = $(LIB_SRC:%.c=build-stack/obj/%.su)
stack:
	@$(MAKE) --no-print-directory BUILD=build-stack CFLAGS="-O2 -g -fstack-usage" build-stack/libkvpager.a
	@echo "stack: the largest frames of the library (bytes; limit $(STACK_LIMIT)):"
	@sort -t '	' -k2,2nr $(STACK_USAGE) | head -n 8
	@awk -F '\t' -v limit=$(STACK_LIMIT) '$$2 > limit || $$3 == "dynamic" { print "stack: over the limit: " $$0; bad = 1 } \
		END { exit bad }' $(STACK_USAGE)

install: all
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin \
		$(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 644 include/kvpager.h include/kvpager_trace.h $(DESTDIR)$(PREFIX)/include/
	install -m 755 $(SHARED) $(DESTDIR)$(PREFIX)/lib/libkvpager.so.$(VERSION)
	ln -sf libkvpager.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libkvpager.so
	install -m 644 $(STATIC) $(DESTDIR)$(PREFIX)/lib/
	install -m 644 $(BUILD)/kvpager.pc $(DESTDIR)$(PREFIX)/lib/pkgconfig/
	for t in $(TOOLS); do install -m 755 $$t $(DESTDIR)$(PREFIX)/bin/; done

clean:
	rm -rf build build-asan build-tsan build-fuzz build-neon build-stack

# jemalloc's own .d files under build/jemalloc are its Makefile's, not ours.
-include $(shell find $(BUILD) -path $(JE_DIR) -prune -o -name '*.d' -print 2>/dev/null)
