"""Build model/_cpu_kernels.cpp for the running Python and MLX (model/cpu_kernels.py loads it).

    python -m canary_server.model.cpu_kernels_build [--dir DIR] [--verbose]

scripts/setup.sh runs this on Linux. g++ compiles the source against MLX's headers and libmlx from its wheel and
nanobind's sources (pip's `nanobind`, whose version must be the one MLX was built with, so that both share the
`mx.array` type), in about 10 s; the library and a stamp of the MLX version and source hash go next to
cpu_kernels.py (or DIR). Exit status 1, with the reason on stderr, when it cannot (no compiler, no nanobind, a
compile error): the encoder then runs as plain MLX ops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx

from .cpu_kernels import SOURCE, expected_stamp, library_path, stamp_path

NANOBIND_DOMAIN = "mlx"  # MLX builds its bindings with NB_DOMAIN mlx: ours must share it to accept mx.array
# C++20: MLX's headers default their comparison operators. -fno-trapping-math lets g++ vectorise the clamps.
CXX_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", f"-DNB_DOMAIN={NANOBIND_DOMAIN}",
             "-fno-trapping-math"]  # fmt: skip


def build(directory: Path | None = None, cxx: str | None = None, verbose: bool = False) -> Path:
    """Compile the kernels for the running Python and MLX into `directory` (default: next to this file). Raises
    RuntimeError with the reason when it cannot (no compiler, no nanobind, a compile error)."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    try:
        import nanobind
    except ImportError as e:
        raise RuntimeError("nanobind is not installed (pip install nanobind)") from e
    mlx_dir = Path(mx.__file__).resolve().parent
    nb_dir = Path(nanobind.source_dir()).parent
    includes = [mlx_dir / "include", Path(nanobind.include_dir()), nb_dir / "ext" / "robin_map" / "include",
                Path(sysconfig.get_paths()["include"])]  # fmt: skip
    inc = [f"-I{p}" for p in includes]
    directory = directory or SOURCE.parent
    stamp = expected_stamp() | {"nanobind": nanobind.__version__, "cxx": cxx}
    with tempfile.TemporaryDirectory(prefix="canary-kernels-") as tmp:
        objects = []
        for src, name in ((Path(nanobind.source_dir()) / "nb_combined.cpp", "nb.o"), (SOURCE, "kernels.o")):
            obj = Path(tmp) / name
            _run([cxx, *CXX_FLAGS, *inc, "-c", str(src), "-o", str(obj)], verbose)
            objects.append(str(obj))
        lib_dir = mlx_dir / "lib"
        out = Path(tmp) / library_path(Path(tmp)).name
        _run([cxx, "-shared", *objects, f"-L{lib_dir}", "-lmlx", f"-Wl,-rpath,{lib_dir}", "-o", str(out)], verbose)
        directory.mkdir(parents=True, exist_ok=True)
        target = library_path(directory)
        tmp_target = target.with_name(target.name + ".tmp")
        shutil.copyfile(out, tmp_target)
        os.replace(tmp_target, target)  # a process that loaded the old file keeps its mapping
    stamp_path(directory).write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m canary_server.model.cpu_kernels_build", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to put the library and its stamp (default: next to model/cpu_kernels.py, where it is loaded from)",
    )
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = build(args.dir, verbose=args.verbose)
    except RuntimeError as e:
        print(f"CPU kernels not built: {e}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
