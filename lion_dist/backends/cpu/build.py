"""Building the fused CPU kernel (`lion.c`): the system C compiler, once per machine, cached.

It compiles in a few seconds with `$CC` (else `cc`, `gcc` or `clang`), whereas compiling a multi-tensor step
with inductor takes minutes for thousands of tensors. The library is built with `-march=native` for this CPU and
cached under `$LION_DIST_CACHE` (default `$XDG_CACHE_HOME/lion_dist`, i.e. `~/.cache/lion_dist`), keyed by the
sources (`lion.c` and its headers), the compiler, the CPU and the OpenMP runtime; a build writes a temporary file
and renames it into place, so processes building at the same time never load a half-written library. When torch
has loaded an OpenMP runtime the kernel links to exactly that file, so its threads are torch's threads.

Loading a library runs its code, so the directory is this user's alone: created 0700, and a directory or library
that another user owns or can write is refused with an error naming it and the fix. That matters most for the
fallback in the shared temporary directory (`<tmp>/lion_dist-<uid>`, used when the cache is not writable), where
anyone could create the directory first and plant a library of the expected name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOURCE = Path(__file__).with_name("lion.c")  # it includes the headers beside it (philox.h, lion_common.h, ...)
ABI_VERSION = 8
# -ffp-contract=off: no fma the reference does not have; -funroll-loops: more loads in flight, a faster step.
_FLAGS = ("-O3", "-funroll-loops", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
# On x86, 512-bit vectors where the CPU has them: gcc's tuning for recent Intel server parts prefers 256-bit ones,
# which doubles the instructions of the bf16 and int8 loops (DeepSpeed's CPU Lion uses 512-bit intrinsics).
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_NATIVE = ("-march=native", "-mprefer-vector-width=512") if _X86 else ("-march=native",)


class CpuKernelUnavailableError(RuntimeError):
    """The fused CPU kernel could not be built or loaded (the message says why and what to do)."""


def cache_dir() -> Path:
    """Where built kernels are kept: `$LION_DIST_CACHE`, else `$XDG_CACHE_HOME/lion_dist` (`~/.cache/lion_dist`)."""
    if os.environ.get("LION_DIST_CACHE"):
        return Path(os.environ["LION_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_dist"


def compiler() -> str | None:
    """The C compiler to build with: `$CC`, else the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in lines:
                    lines.append(line)
                if not line.strip() and lines:
                    break  # the first processor's entry is enough
    except OSError:
        pass
    return platform.machine() + "".join(lines)


_OPENMP_LIBRARY = re.compile(r"^lib(gomp|iomp5|omp)\b.*\.so")


def openmp_runtime() -> Path | None:
    """The OpenMP runtime this process has loaded (torch's, on Linux), or None.

    The kernel links to exactly this file, so its threads are torch's threads: a second runtime would leave
    torch's idle workers spinning on the cores the kernel needs (measured: up to 1.25x slower steps).
    """
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and _OPENMP_LIBRARY.match(os.path.basename(fields[5].strip())):
                    return Path(fields[5].strip())
    except OSError:
        pass
    return None


def _library_path(cc: str, flags: Sequence[str], runtime: Path | None, directory: Path) -> Path:
    key = hashlib.sha256()
    sources = [SOURCE.read_bytes()] + [h.read_bytes() for h in sorted(SOURCE.parent.glob("*.h"))]
    parts = [*sources, os.path.realpath(cc), os.stat(cc).st_mtime_ns, flags, _cpu_signature(), str(runtime)]
    if runtime is not None:
        parts.append(os.stat(runtime).st_mtime_ns)
    for part in parts:
        key.update(repr(part).encode())
    kind = "openmp" if runtime is not None else "pthreads"
    return directory / f"lion_cpu_kernel_v{ABI_VERSION}_{kind}_{key.hexdigest()[:20]}.so"


def _compile_commands(cc: str, flags: Sequence[str], runtime: Path | None, out: str) -> list[list[str]]:
    if runtime is None:
        return [[cc, *flags, "-o", out, str(SOURCE), "-lm"]]
    obj = out + ".o"  # compile with -fopenmp, then link to torch's runtime file (not the compiler's libgomp)
    return [
        [cc, *flags, "-fopenmp", "-c", "-o", obj, str(SOURCE)],
        [cc, *flags, "-o", out, obj, str(runtime), f"-Wl,-rpath,{runtime.parent}", "-lm"],
    ]


def _unsafe(path: Path, what: str) -> str | None:
    """Why `path` (this user's kernel directory or a library in it) is not safe to load code from, or None.

    Anyone who can write the directory or the file, or who owns it, can put their code into this process."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners (Windows): the per-user directories are private already
    uid = os.getuid()
    for st in (os.lstat(path), os.stat(path)):  # a symbolic link itself (only its owner can replace it), its target
        if st.st_uid != uid:
            return f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
            return f"{what} {path} is writable by other users (mode {stat.filemode(st.st_mode)})"
    return None


def _check_safe(path: Path, what: str) -> None:
    if (why := _unsafe(path, what)) is not None:
        raise CpuKernelUnavailableError(
            f"lion_dist will not load its CPU kernel from there: {why}, so another user could have put code in "
            f"it. Fix: remove it (rm -rf {path}) or make it yours and private (chown $USER, chmod go-w), or set "
            "LION_DIST_CACHE to a directory of your own."
        )


def _private_dir(directory: Path) -> None:
    """Create `directory` (0700: only this user) unless it exists; refuse it unless it is this user's and no one
    else can write it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    _check_safe(directory, "the kernel directory")


def fallback_dir() -> Path:
    """Where the kernel is built when the cache directory is not writable: `<tmp>/lion_dist-<uid>`, private."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"lion_dist-{uid}"


def build(directory: Path | None = None, *, openmp: bool = True, flags: Sequence[str] | None = None) -> Path:
    """Compile the kernel into `directory` unless it is there already; return its path.

    The default directory is `cache_dir()`, or `fallback_dir()` (a per-user one in the temporary directory) when
    that is not writable. Either is created private (0700), and a directory or library not owned by this user or
    writable by others is refused (`CpuKernelUnavailableError`, naming the path and the fix): in a shared
    temporary directory another user could create it first and plant a library of the expected name. Tries, in
    order: OpenMP on torch's runtime (`openmp_runtime()`; not with `openmp=False`), then pthreads; each with
    `-march=native`, then portable flags (`flags` replaces those two: e.g. `("-mavx2", "-mfma")`). Raises
    `CpuKernelUnavailableError` with the compiler's output when nothing works.
    """
    if directory is None:
        try:
            return build(cache_dir(), openmp=openmp, flags=flags)
        except OSError:  # e.g. a read-only home directory: build in the temporary directory instead
            return build(fallback_dir(), openmp=openmp, flags=flags)
    cc = compiler()
    if cc is None:
        raise CpuKernelUnavailableError(
            "no C compiler found (tried $CC, cc, gcc, clang); install one (e.g. apt-get install gcc) "
            "or set CC, or use backend='foreach'"
        )
    directory = Path(directory)
    _private_dir(directory)
    errors = []
    runtimes = dict.fromkeys([openmp_runtime() if openmp else None, None])  # OpenMP first when there is one
    flag_sets = (_FLAGS + _NATIVE, _FLAGS) if flags is None else (_FLAGS + tuple(flags),)
    for runtime, chosen in itertools.product(runtimes, flag_sets):
        target = _library_path(cc, chosen, runtime, directory)
        if target.exists() or target.is_symlink():
            _check_safe(target, "the kernel library")
            return target
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=directory)  # mode 0600
        os.close(fd)
        try:
            for command in _compile_commands(cc, chosen, runtime, tmp):
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(command)}:\n{proc.stderr.strip()[-2000:]}")
                    break
            else:
                os.chmod(tmp, 0o755)  # the linker recreates its output under the umask: writable by this user only
                os.replace(tmp, target)  # atomic: a concurrent build or load sees a whole file or none
                return target
        finally:
            for leftover in (tmp, tmp + ".o"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    raise CpuKernelUnavailableError(
        "could not compile lion_dist's CPU kernel:\n" + "\n".join(errors) + "\nUse backend='foreach' meanwhile."
    )
