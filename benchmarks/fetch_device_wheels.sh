#!/bin/sh
# Fill .whl/ (git-ignored) with the wheels a GPU machine without network access lacks (install
# them there as benchmarks/README.md shows):
# DeepSpeed (built here: pure Python, its ops JIT-compile there), its runtime needs,
# pyrwkv-tokenizer and fla-core (for the WKV comparison), all for CPython 3.12 x86_64.
# With --lmeval, also .whl-hf/ (git-ignored): lm-evaluation-harness and what it needs beyond a GPU
# image that has transformers, accelerate, pyarrow, pandas, scikit-learn and sacrebleu
# (benchmarks/bench_lmeval.py), and the rwkv package.
# Usage (repository root, on the dev machine): sh benchmarks/fetch_device_wheels.sh [--lmeval]
set -eu
cd "$(dirname "$0")/.."
LMEVAL=0
[ "${1:-}" = "--lmeval" ] && LMEVAL=1
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
if [ "$LMEVAL" = 1 ]; then
  mkdir -p .whl-hf
  # sdists only on PyPI (pure Python): built here
  /tmp/dswheel-venv/bin/pip wheel -q --no-deps -w .whl-hf sqlitedict==2.1.0 word2number==1.1 rouge-score==0.1.2
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl-hf lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
    pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 typepy==1.3.5 tabledata==1.3.5 \
    tcolorpy==0.1.7 pathvalidate==3.3.1 chardet==6.0.0.post1 pytz==2026.6 nltk==3.10.4 \
    more-itertools==11.2.1 rwkv==0.8.32
  ls -la .whl-hf
fi
