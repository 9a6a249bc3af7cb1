# The two commands a newcomer needs: `make demo` and `make test`.
# Both run `make setup` first, which installs only what is missing.

.PHONY: setup test sanity units integration molecule demo bench bench-quick build changelog clean

setup:
	scripts/setup

test: setup
	scripts/test

sanity integration molecule: setup
	scripts/test $@

# The fast loop, with the branch coverage of the module_utils (lines missed per file). The data
# file stays in .cache: nothing lands in the tree.
UNIT_COVERAGE = --cov=$(CURDIR)/plugins/module_utils --cov-branch --cov-report=term-missing
units: setup
	COVERAGE_FILE=$(CURDIR)/.cache/coverage-units scripts/test units -- $(UNIT_COVERAGE)

lint: setup
	scripts/lint

demo: setup
	.venv/bin/python demo/demo.py

# Holds the integration lock: a benchmark must not share the machine with QEMU tests.
BENCH_LOCK = flock /tmp/savestate-integration.lock

bench: setup
	$(BENCH_LOCK) .venv/bin/python benchmarks/run.py $(BENCH_ARGS)

# 1 GiB, 1 repetition, every contender and the whole-host rounds; prints, does not touch the docs.
bench-quick: setup
	$(BENCH_LOCK) .venv/bin/python benchmarks/run.py --sizes 1 --reps 1 --output '' --command 'make bench-quick' $(BENCH_ARGS)

build: setup
	.venv/bin/ansible-galaxy collection build --force

changelog: setup
	.venv/bin/antsibull-changelog release

clean:
	rm -rf .cache tests/output savestate-qemu-*.tar.gz
