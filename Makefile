# Thin wrappers over the cargo commands in README.md.
.PHONY: run test test-mpi fixtures golden fmt clippy cuda ci-times

# The main job: the whole pipeline offline on the embedded task.
run:
	cargo run --release -- demo

test:
	cargo test

# Regenerate the self-made fixtures (tokenizers, tiny models, hub cache) in fixtures/.
fixtures:
	cargo run --release -- fixtures --out fixtures

# Golden outputs of the fixtures from transformers (needs Python; CI does not),
# with the pinned stack the files in tests/golden record (tests/GOLDEN.md).
golden: fixtures
	python3 -m venv .venv-golden
	.venv-golden/bin/pip install -q torch==2.15.0 transformers==5.23.0 trl==1.12.0 peft==0.21.2 safetensors
	.venv-golden/bin/python scripts/make_golden.py fixtures tests
	.venv-golden/bin/python scripts/make_golden_tokenizers.py fixtures tests
	.venv-golden/bin/python scripts/make_golden_peft.py fixtures tests
	.venv-golden/bin/python scripts/make_golden_chat.py tests
	.venv-golden/bin/python scripts/make_golden_render.py tests
	.venv-golden/bin/python scripts/make_tiny_policy.py fixtures/models/learn-llama
	.venv-golden/bin/python scripts/make_golden_dpo.py fixtures tests

fmt:
	cargo fmt --all

clippy:
	cargo clippy --all-targets -- -D warnings

# CUDA build on a machine without a GPU (installs nvcc from PyPI wheels).
cuda:
	eval "$$(scripts/cuda-toolchain.sh)" && cargo build --release --features cuda

# Clean build and test times, as reported in closing notes.
ci-times:
	scripts/ci-times.sh

# The data-parallel tests (needs OpenMPI: docs/distributed.md).
test-mpi:
	cargo test --features mpi --test it dist::
