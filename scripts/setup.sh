#!/usr/bin/env bash
# Create .venv and install canary-server into it. `--dev` adds the test tools.
# On Linux it also installs Debian's OpenBLAS (libopenblas0-pthread): MLX's CPU wheel links a slow
# reference BLAS, and model/blas.py preloads OpenBLAS instead (about 20x faster fp32 matmuls). `--dev` on Linux
# also installs HAProxy (the router tests/test_router.py runs two instances behind; README, "Several machines").
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "warning: install OpenBLAS (libopenblas.so.0) for fast fp32 matmuls on Linux" >&2
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

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The editable install maps the repository's folders into one `canary_server` package; setuptools prints an
# informational notice about that layout (a UserWarning), which is all that ignoring UserWarning here hides.
PYTHONWARNINGS="ignore::UserWarning" .venv/bin/python -m pip install -q -e ".${extras}"

echo "canary-server $(.venv/bin/canary-server --version | cut -d' ' -f2) is installed in .venv. Next:"
if [ -n "$extras" ]; then
    echo "  .venv/bin/python -m pytest -n 2         # run the tests (two workers)"
fi
echo "  .venv/bin/canary-server serve           # start the server (the first start downloads the model)"
echo "  (or 'source .venv/bin/activate' once, then just 'canary-server serve'; 'canary-server --help' for more)"
