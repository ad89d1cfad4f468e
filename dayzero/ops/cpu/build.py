"""Build and load the native CPU kernels: each C source of this package (`<module>.c`) compiled
once per machine with the system C compiler into its own shared library, loaded with ctypes
(one library per source, so a module that fails to build leaves the others usable).

A library is keyed by a hash of the sources, the compiler's version, the flags and the CPU
(the build uses -march=native, so a library is never shared between different CPUs), and lives in
`$DAYZERO_CACHE_DIR/cpu` or `~/.cache/dayzero/cpu`. OpenMP pragmas link against `libgomp.so.1`,
the runtime PyTorch's CPU wheel already loaded, so kernels and PyTorch share one thread pool.
No compiler, or a failed build, raises `NativeUnavailable` with the compiler's message; the op
table then falls back to the PyTorch twins (see ops/__init__.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
HEADERS = ("common.h", "fastdecode.h")  # included by sources; part of every library's key


def flags() -> tuple[str, ...]:
    """Compiler flags; DAYZERO_CPU_MARCH overrides -march=native (e.g. x86-64 to build and test
    the scalar fallbacks of kernels that have SIMD paths)."""
    march = os.environ.get("DAYZERO_CPU_MARCH", "native")
    # -ffp-contract=off: no FMA contraction, so kernels round products and sums where the twins do
    return ("-O3", f"-march={march}", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno",
            "-fopenmp", "-Wno-psabi")

_libs: dict[str, ctypes.CDLL] = {}
_errors: dict[str, str] = {}


class NativeUnavailable(RuntimeError):
    """The native CPU kernels cannot be built or loaded on this machine (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("DAYZERO_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "dayzero") / "cpu"


def _cpu_id() -> str:
    """The CPU the library is built for: model name + feature flags where /proc/cpuinfo has them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeUnavailable("no C compiler found (set CC, or install gcc or clang)")
    return cc


def library_path(module: str) -> Path:
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    h = hashlib.sha256()
    for part in (version, " ".join(flags()), platform.machine(), _cpu_id()):
        h.update(part.encode())
    for name in (*HEADERS, f"{module}.c"):
        h.update((HERE / name).read_bytes())
    return cache_dir() / f"libdayzero_{module}-{h.hexdigest()[:16]}.so"


def build(module: str, force: bool = False) -> Path:
    """Compile `<module>.c` if this machine has no current build of it; return the library's path."""
    path = library_path(module)
    if path.exists() and not force:
        return path
    cc = _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cc, *flags(), "-I", str(HERE), "-o", tmp, str(HERE / f"{module}.c"), "-lm"]
    print(f"dayzero: compiling native CPU kernels {module}.c (once per machine, cached in {path.parent})",
          file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise NativeUnavailable(f"building the native CPU kernels of {module}.c failed:\n$ {' '.join(cmd)}\n{r.stderr[-4000:]}")
        os.replace(tmp, path)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}
_functions: dict[str, object] = {}


def lib(module: str) -> ctypes.CDLL:
    """The loaded library of `<module>.c` (built on first use); raises NativeUnavailable when it
    cannot be (the reason is remembered: one failed build per process)."""
    if module in _libs:
        return _libs[module]
    if module in _errors:
        raise NativeUnavailable(_errors[module])
    try:
        _libs[module] = ctypes.CDLL(str(build(module)))
    except (NativeUnavailable, OSError) as e:
        _errors[module] = str(e)
        raise NativeUnavailable(_errors[module]) from e
    return _libs[module]


def bind(library: ctypes.CDLL, name: str, signature: str):
    """Kernel `name` of a loaded library with its argument types (see `function`)."""
    fn = getattr(library, name)
    fn.argtypes = [_CTYPES[c] for c in signature]
    fn.restype = None
    return fn


def function(module: str, name: str, signature: str):
    """Kernel `name` of `<module>.c` with its argument types: one letter per argument,
    p = pointer (pass `tensor.data_ptr()`), i = int64, f = float. Kernels return nothing."""
    key = f"{module}.{name}"
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = bind(lib(module), name, signature)
    return fn


def available(module: str) -> bool:
    try:
        lib(module)
        return True
    except NativeUnavailable:
        return False
