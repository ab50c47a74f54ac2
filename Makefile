# Thin wrappers over the cargo commands in README.md.
.PHONY: run test fixtures fmt clippy cuda ci-times

# The main job: sample from the self-made tiny model (made on first use).
run:
	cargo run --release -- generate --prompt "the movie was" --prompt "i think this film"

test:
	cargo test

# Regenerate the self-made fixtures (tokenizer and tiny model) in fixtures/.
fixtures:
	cargo run --release -- fixtures --out fixtures

fmt:
	cargo fmt --all

clippy:
	cargo clippy --all-targets -- -D warnings

# CUDA build on a machine without a GPU (installs nvcc from PyPI wheels).
cuda:
	eval "$$(../shared/cuda-toolchain.sh)" && cargo build --release --features cuda

# Clean build and test times, as reported in closing notes.
ci-times:
	scripts/ci-times.sh
