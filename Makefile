# One target a job; CI runs exactly `make lint test` (see .ci/run).
.PHONY: all deps build run test lint bench soak miri fmt clean

all: build

deps:
	@scripts/deps.sh

build: deps
	cargo build --release

# Starts the proxy. With neither REDIS_URL nor REDIS_HOST set and nothing on
# 127.0.0.1:6379, a throwaway loopback redis-server is started first.
run: build
	@if [ -z "$$REDIS_URL" ] && [ -z "$$REDIS_HOST" ]; then scripts/redis-local.sh start 6379; fi
	./target/release/redis-proxy

# Examples and benches are built (so they cannot rot) but hold no tests;
# the run ends on the system tests, then redis-py against the debug binary
# (a venv under target/; a loud SKIPPED line when PyPI is unreachable).
test: deps
	cargo build --all-targets
	cargo test --lib --bins --tests
	scripts/test-redis-py.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

bench: deps
	cargo bench --bench cache
	cargo bench --bench hop
	scripts/bench.sh

soak: build
	scripts/soak.sh

# The cache's unsafe code (src/cache/entry.rs) under Miri; nightly, ~20 min.
miri:
	rustup toolchain install nightly --profile minimal --component miri,rust-src
	cargo +nightly miri test --lib cache::

fmt:
	cargo fmt --all

clean:
	cargo clean
