# The two commands a newcomer needs: `make demo` and `make test`.
# Both run `make setup` first, which installs only what is missing.

.PHONY: setup test sanity units integration molecule demo bench build changelog clean

setup:
	scripts/setup

test: setup
	scripts/test

sanity units integration molecule: setup
	scripts/test $@

demo: setup
	.venv/bin/python demo/demo.py

bench: setup
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)

build: setup
	.venv/bin/ansible-galaxy collection build --force

changelog: setup
	.venv/bin/antsibull-changelog release

clean:
	rm -rf .cache tests/output savestate-qemu-*.tar.gz
