#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-server (as vendored by llama-cpp-python 0.3.36, the
# llama.cpp of October 2026) natively into a temporary folder, for side-by-side runs; prints the
# folder holding the binaries. Nothing of it is committed.
#
#   LLAMA_DIR=/tmp/llama scripts/llama-cpp.sh     # reuses a previous build there
set -euo pipefail
dir=${LLAMA_DIR:-/tmp/llama}
bin=$dir/build/bin
if [[ -x $bin/llama-bench && -x $bin/llama-server ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$dir"
python3 -m venv "$dir/v"
"$dir/v/bin/pip" install --quiet --disable-pip-version-check scikit-build-core cmake ninja >&2
export PATH=$dir/v/bin:$PATH
if [[ ! -d $dir/src ]]; then
    pip download --quiet --no-deps --no-build-isolation llama-cpp-python==0.3.36 -d "$dir/src" >&2
fi
tar -xzf "$dir"/src/llama_cpp_python-0.3.36.tar.gz -C "$dir"
source=$dir/llama_cpp_python-0.3.36/vendor/llama.cpp
cmake -S "$source" -B "$dir/build" -G Ninja -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$dir/build" --target llama-bench llama-server -j "$(nproc)" >&2
echo "$bin"
