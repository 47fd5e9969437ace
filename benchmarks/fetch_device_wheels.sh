#!/bin/sh
# Fill .whl/ (git-ignored) with the wheels a GPU machine without network access lacks (install
# them there as benchmarks/README.md shows):
# DeepSpeed (built here: pure Python, its ops JIT-compile there), its runtime needs,
# pyrwkv-tokenizer and fla-core (for the WKV comparison), all for CPython 3.12 x86_64.
# Usage (repository root, on the dev machine): sh benchmarks/fetch_device_wheels.sh
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m venv --system-site-packages /tmp/dswheel-venv
/tmp/dswheel-venv/bin/pip install -q wheel setuptools  # bdist_wheel for the build below
/tmp/dswheel-venv/bin/pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 pyrwkv-tokenizer==0.9.1 fla-core==0.6.0 \
  flash-linear-attention==0.6.0
ls -la .whl
