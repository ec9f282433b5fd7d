#!/usr/bin/env bash
# Create .venv and install canary-server into it. `--dev` adds the test tools; `--check` only says which Python it
# would use (and how it would get one) and changes nothing.
# MLX needs Python 3.10+, and macOS's own python3 is 3.9: the interpreter is $PYTHON if set, else the newest
# python3.13 ... python3.10 on PATH (then Homebrew's on macOS), else python3 if it is 3.10+, else a Python 3.12
# from uv (installed with pip if missing; uv downloads a standalone Python build).
# On Linux it also installs Debian's OpenBLAS (libopenblas0-pthread): MLX's CPU wheel links a slow
# reference BLAS, and model/blas.py preloads OpenBLAS instead (about 20x faster fp32 matmuls). `--dev` on Linux
# also installs HAProxy (the router tests/test_router.py runs two instances behind; README, "Several machines")
# and Chromium (the browser page's tests).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
check=0
for arg in "$@"; do
    case "$arg" in
        --dev) extras="[dev]" ;;
        --check) check=1 ;;
        *) echo "setup.sh: unknown option $arg (use --dev, --check)" >&2; exit 2 ;;
    esac
done
UV_PYTHON_VERSION=3.12

# Prints "X.Y" if $1 runs and is Python 3.10 or newer; fails otherwise (a pyenv shim of a version that is not
# installed fails here too, which is why every candidate is run, not just looked up).
py_ok() {
    "$1" -c 'import sys; assert sys.version_info >= (3, 10); print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

py_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?"
}

# Sets `python` and `how` (a sentence for the user), or leaves `python` empty.
find_python() {
    python="" how=""
    if [ -n "${PYTHON:-}" ]; then
        if ! command -v "$PYTHON" >/dev/null; then
            echo "setup.sh: PYTHON=$PYTHON: no such interpreter" >&2; exit 2
        fi
        if ! py_ok "$PYTHON" >/dev/null; then
            echo "setup.sh: PYTHON=$PYTHON is Python $(py_version "$PYTHON"); canary-server (MLX) needs 3.10 or newer" >&2
            exit 2
        fi
        python="$(command -v "$PYTHON")" how="PYTHON=$PYTHON"; return
    fi
    local dirs=("")
    [ "$(uname -s)" = "Darwin" ] && dirs+=(/opt/homebrew/bin/ /usr/local/bin/)  # Homebrew: Apple Silicon, Intel
    local dir minor candidate
    for dir in "${dirs[@]}"; do
        for minor in 13 12 11 10; do
            candidate="${dir}python3.${minor}"
            if py_ok "$candidate" >/dev/null; then
                python="$(command -v "$candidate")" how="found on ${dir:-PATH}"; return
            fi
        done
    done
    if py_ok python3 >/dev/null; then
        python="$(command -v python3)" how="python3 on PATH"
    fi
}

# No suitable Python anywhere: uv (from PyPI) provides one. Sets `python` and `how`.
python_from_uv() {
    local uv
    uv="$(command -v uv || true)"
    if [ -z "$uv" ]; then
        local base
        base="$(python3 -m site --user-base 2>/dev/null || true)"
        if [ -n "$base" ] && [ -x "$base/bin/uv" ]; then
            uv="$base/bin/uv"
        elif [ "$check" = 1 ]; then
            python="" how="would run 'python3 -m pip install --user uv', then 'uv python install $UV_PYTHON_VERSION'"
            return
        else
            echo "No Python 3.10+ found (python3 is $(py_version python3)); installing uv with pip to get Python $UV_PYTHON_VERSION."
            python3 -m pip install -q --disable-pip-version-check --user uv
            uv="$(python3 -m site --user-base)/bin/uv"
        fi
    fi
    python="$("$uv" python find ">=3.10" 2>/dev/null || true)"
    if [ -n "$python" ]; then how="found by uv ($uv)"; return; fi
    if [ "$check" = 1 ]; then
        how="would run '$uv python install $UV_PYTHON_VERSION'"; return
    fi
    echo "Installing Python $UV_PYTHON_VERSION with uv ($uv python install $UV_PYTHON_VERSION)."
    if ! "$uv" python install "$UV_PYTHON_VERSION"; then
        echo "setup.sh: uv could not install Python $UV_PYTHON_VERSION (it downloads it from GitHub). Install Python" \
            "3.10+ yourself (macOS: 'brew install python@3.12') and run setup.sh again, or choose one with PYTHON=..." >&2
        exit 1
    fi
    python="$("$uv" python find "$UV_PYTHON_VERSION")" how="installed by uv ($uv)"
}

find_python
if [ -z "$python" ]; then
    python_from_uv
fi
if [ "$check" = 1 ]; then
    if [ -n "$python" ]; then
        echo "setup.sh would use Python $(py_version "$python") at $python ($how)"
    else
        echo "setup.sh found no Python 3.10+ (python3 is $(py_version python3)); it $how"
    fi
    exit 0
fi
echo "Using Python $(py_version "$python") at $python ($how)."

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "warning: install OpenBLAS (libopenblas.so.0) for fast fp32 matmuls on Linux" >&2
    fi
fi

# Linux: g++ builds the C helpers that make the CPU fast (canary_server/_gemv_forward.c at the pip install,
# model/_cpu_kernels.cpp after it). Without it everything still works, slower; the notes at the end say so.
if [ "$(uname -s)" = "Linux" ] && ! command -v g++ >/dev/null; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq g++ >/dev/null \
            || echo "warning: could not install g++: the CPU runs without the C helpers (slower)" >&2
    fi
fi

if [ -n "$extras" ] && [ "$(uname -s)" = "Linux" ] && ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq haproxy >/dev/null
    else
        echo "warning: install haproxy for tests/test_router.py" >&2
    fi
fi

# `--dev` on Linux: Debian's Chromium for the browser page's tests (tests/test_browser_page.py drives it headless;
# Playwright's own browser download is not used). Elsewhere those tests find an installed Chrome or skip.
if [ -n "$extras" ] && [ "$(uname -s)" = "Linux" ] && ! command -v chromium >/dev/null \
    && ! command -v chromium-browser >/dev/null; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null \
            || echo "warning: could not install chromium: tests/test_browser_page.py will skip its browser tests" >&2
    else
        echo "warning: install chromium for tests/test_browser_page.py" >&2
    fi
fi

# A .venv left by an older Python (e.g. a first try with macOS's 3.9) cannot be reused: make it again.
if [ -x .venv/bin/python ] && ! py_ok .venv/bin/python >/dev/null; then
    echo "Removing .venv: it was made with Python $(py_version .venv/bin/python)."
    rm -rf .venv
fi
"$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The editable install maps the repository's folders into one `canary_server` package; setuptools prints an
# informational notice about that layout (a UserWarning), which is all that ignoring UserWarning here hides.
PYTHONWARNINGS="ignore::UserWarning" .venv/bin/python -m pip install -q -e ".${extras}"

# Linux: the optional C helper (canary_server/_gemv_forward.c) needs a C compiler at install; without one the install
# still works, with slower batch-1 decoding on the CPU (README, "Linux note: OpenBLAS").
if [ "$(uname -s)" = "Linux" ] && ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('canary_server._gemv_forward') is None)"; then
    echo "note: no C compiler found, so the matrix-vector helper was not built (install gcc and run this again for faster decoding on this CPU)"
fi
# Linux: the encoder's fused CPU kernels (model/_cpu_kernels.cpp, an MLX extension) need g++ (a few seconds);
# without them the same encoder runs as plain MLX ops, slower on the CPU (README, "Linux note: OpenBLAS").
if [ "$(uname -s)" = "Linux" ] && ! why=$(.venv/bin/python -m canary_server.model.cpu_kernels_build 2>&1 >/dev/null); then
    echo "note: ${why%%$'\n'*} (install g++ and run this again for a faster encoder on this CPU)"
fi
echo "canary-server $(.venv/bin/canary-server --version | cut -d' ' -f2) is installed in .venv (Python $(py_version .venv/bin/python)). Next:"
if [ -n "$extras" ]; then
    echo "  .venv/bin/python -m pytest -n 2         # run the tests (two workers)"
fi
echo "  .venv/bin/canary-server serve           # start the server (the first start downloads the model)"
echo "  (or 'source .venv/bin/activate' once, then just 'canary-server serve'; 'canary-server --help' for more)"
