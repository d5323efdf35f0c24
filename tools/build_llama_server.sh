#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp source vendored in the
# llama-cpp-python sdist (the same version the engine embeds, so the same model behaves the
# same), and caches the binary. The real-server tests and `tools/bench.py --only remote`
# use it when it is there; without it they use llama-cpp-python's own server.
#   tools/build_llama_server.sh            # ~15 min on 2 cores, once (tools/dev.sh test runs it)
#   NPC_ENGINE_LLAMA_SERVER=/path/to/llama-server   # or point at your own build
# Prints the binary's path. No network but PyPI: the web UI is not built or downloaded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
VERSION="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/npc-engine/llama-server/$VERSION"
BIN="$CACHE/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "Building llama-server $VERSION in $WORK (once; cached in $CACHE) …" >&2
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$CACHE"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
