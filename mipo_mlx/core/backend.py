"""Finding a compute backend for MLX, and a fast BLAS for its CPU backend.

Both must happen before `mlx.core` is first imported, which is why the package
`__init__` calls `prefer_system_blas` and the CLIs call `require_mlx` before
importing anything that imports mlx.

MLX's Linux CPU wheel links a reference BLAS (about 5 GFLOP/s for a float32 1024x1024
matmul on a 2-core x86 machine). Its `cblas_*` and LAPACK symbols resolve through the
global scope first, so a library loaded here with RTLD_GLOBAL wins. In order:
1. MIPO_MLX_BLAS: a library path, or off (keep the bundled one);
2. the system OpenBLAS (Debian's libopenblas0-pthread), where it is installed;
3. the OpenBLAS of the `ngsolve-openblas` wheel, which `pip install 'mipo_mlx[cpu]'`
   brings on Linux x86-64: a DYNAMIC_ARCH build that exports the unprefixed symbols.
   It links `libgfortran.so.5`, which a fresh machine may lack; then the libgfortran
   that MLX's own wheel ships (under a hashed name) is loaded under that name first.
Where MLX has no backend library at all, nothing is loaded and nothing is said: the CLIs'
one-line missing-backend error is then the only line. BENCHMARKS.md has the measured speed of each.

OpenBLAS starts its threads when it loads, reading OPENBLAS_NUM_THREADS / OMP_NUM_THREADS and
OPENBLAS_THREAD_TIMEOUT (how long an idle thread spins: 2^n cycles) then, so the thread policy
(MIPO_MLX_THREADS, `THREAD_POLICIES`) is applied to the environment around the load and the
environment is put back after it (child processes choose for themselves). Under the default
policy, `adapt`, the commands then start `blas_governor`, which moves the count between one and
the pool's size with the idle cores. A thread count the user sets is never overridden. MLX's
CPU backend computes on one thread of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib.machinery
import importlib.util
import json
import os
import platform
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .blas_governor import Governor
from .errors import UserError

# Debian/Ubuntu's multithreaded OpenBLAS, then whatever the loader can find.
_BLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
PIP_BLAS = "ngsolve_openblas"  # the import name of the ngsolve-openblas wheel
_loaded_blas: str | None = None

BACKEND_HINT = (
    "mlx has no compute backend on this machine: on Linux the plain `mlx` wheel ships none; "
    "install one with `pip install 'mipo_mlx[cpu]'` (CPU) or `pip install 'mipo_mlx[cuda]'` "
    "(NVIDIA GPU); on macOS plain `mlx` uses Metal"
)
SLOW_BLAS = (
    "bundled reference BLAS (slow; on Linux x86-64 `pip install 'mipo_mlx[cpu]'` brings a "
    "fast one, elsewhere install the system OpenBLAS)"
)


THREADS_SETTING = "MIPO_MLX_THREADS"
RUNS_SETTING = "MIPO_MLX_LOCAL_RUNS"
# The thread counts OpenBLAS reads, its own first: where the user set one, it alone decides.
USER_COUNTS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
QUIET_SPIN = "4"  # OPENBLAS_THREAD_TIMEOUT: an idle thread spins 2^4 cycles, then sleeps
# Name -> (thread count: every core, one, or the usable cores split among this machine's
# runs; quiet idle threads). Beside any other busy process a parallel call waits for its
# slowest thread, and OpenBLAS's own idle threads spin ~0.1 s after every call: on 2 cores a
# run beside another training took 8x as long with 2 threads, quiet or not. One thread alone
# on an idle machine leaves the other cores idle (a third longer end to end on 2 cores). The
# default, `adapt`, loads a pool of the split size and computes on as many threads as the
# machine leaves cores idle, one while other processes are busy (`blas_governor`).
THREAD_POLICIES = {
    "openblas": ("all", False),
    "one": ("one", False),
    "split": ("split", False),
    "split_quiet": ("split", True),
    "adapt": ("split", False),
}
ADAPTIVE = {"adapt"}
DEFAULT_THREADS = "adapt"
_threads: dict = {}  # what the policy chose when the BLAS loaded: policy, runs, settings


def thread_settings(policy: str, cores: int, runs: int) -> dict[str, str]:
    """The environment OpenBLAS loads with under `policy`, on `cores` usable cores shared by
    `runs` processes at once."""
    count, quiet = THREAD_POLICIES[policy]
    settings = {}
    if count != "all":
        settings["OPENBLAS_NUM_THREADS"] = str(1 if count == "one" else max(1, cores // runs))
    if quiet:
        settings["OPENBLAS_THREAD_TIMEOUT"] = QUIET_SPIN
    return settings


def _whole(text: str) -> int | None:
    return int(text) if text.strip().isdigit() and int(text) > 0 else None


def _ring_addresses(hostfile: str) -> list[str]:
    """The address of each rank in mlx.launch's ring hostfile (a JSON list, per rank, of
    "ip:port"), loopback as one name; [] where there is none (one rank) or it can't be read."""
    try:
        ranks = json.loads(Path(hostfile).read_text()) if hostfile else []
        found = [str(rank[0]).rsplit(":", 1)[0] for rank in ranks]
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return []
    return ["loopback" if a.startswith("127.") or a in ("::1", "localhost") else a for a in found]


def local_runs(environ: Mapping[str, str]) -> int:
    """How many processes of this kind run on this machine at once: MIPO_MLX_LOCAL_RUNS where
    set; else the ranks a launcher put on this host (Open MPI and MPICH say so; in mlx.launch's
    ring hostfile, the ranks with this rank's address; NCCL's MLX_WORLD_SIZE: all); else 1."""
    for key in (RUNS_SETTING, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if _whole(environ.get(key, "")):
            return int(environ[key])
    ring = _ring_addresses(environ.get("MLX_HOSTFILE", ""))
    rank = environ.get("MLX_RANK", "0")
    if ring and rank.isdigit() and int(rank) < len(ring):
        return ring.count(ring[int(rank)])
    return _whole(environ.get("MLX_WORLD_SIZE", "")) or 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_policy(environ: Mapping[str, str], cores: int) -> tuple[str, dict[str, str], list[str]]:
    """The policy that applies ("user" where the user set a thread count), the settings to
    load OpenBLAS with, and the notes to print: a setting not understood is a note and the
    default applies (a thread count is never a reason to stop a run)."""
    notes = []
    policy = environ.get(THREADS_SETTING, "") or DEFAULT_THREADS
    if policy not in THREAD_POLICIES:
        notes.append(
            f"note: {THREADS_SETTING}={policy} is not a thread policy; using {DEFAULT_THREADS} "
            f"(set it to one of {', '.join(THREAD_POLICIES)})"
        )
        policy = DEFAULT_THREADS
    runs = environ.get(RUNS_SETTING, "")
    if runs and not _whole(runs):
        notes.append(f"note: {RUNS_SETTING}={runs} is not a whole number above 0; ignored")
        environ = {k: v for k, v in environ.items() if k != RUNS_SETTING}
    if any(environ.get(key) for key in USER_COUNTS):
        return "user", {}, notes
    settings = thread_settings(policy, cores, local_runs(environ))
    return policy, {k: v for k, v in settings.items() if not environ.get(k)}, notes


@contextlib.contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    """`settings` in the environment for the block, then the environment as it was."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _system_openblas() -> str | None:
    arch = platform.machine()
    for pattern in _BLAS_CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def pip_openblas() -> str | None:
    """The library file of the ngsolve-openblas wheel, where it is installed (found without
    importing the package, whose import would load it with its own messages)."""
    spec = importlib.util.find_spec(PIP_BLAS)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("libopenblas*.so*"))
        if found:
            return str(found[0])
    return None


def _candidates() -> list[str]:
    """Libraries to try, in order; an explicit MIPO_MLX_BLAS path alone (and the usual search
    after it when it does not exist)."""
    choice = os.environ.get("MIPO_MLX_BLAS", "")
    if choice.lower() in {"0", "off", "none", "bundled"}:
        return []
    if choice:
        if Path(choice).exists():
            return [choice]
        print(
            f"note: MIPO_MLX_BLAS={choice}: no such file; looking for the system OpenBLAS "
            "instead (set it to a library path, or to off)",
            file=sys.stderr,
        )
    return [path for path in (_system_openblas(), pip_openblas()) if path]


def _soname_offset(data: bytes) -> tuple[int, int] | None:
    """(file offset, length) of the DT_SONAME string of a 64-bit little-endian ELF library."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
    if dynamic is None:
        return None
    strings = sections[dynamic[6]][4]  # its sh_link: .dynstr's file offset
    for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 14:  # DT_SONAME
            start = strings + value
            return start, data.index(b"\0", start) - start
        if tag == 0:
            break
    return None


def mlx_library() -> Path | None:
    """MLX's own library (`mlx/lib/libmlx.so`) as `import mlx` will find it, or None (no MLX,
    or one without a backend: the plain Linux wheel, a stand-in). Read from sys.path as the
    import system reads it: a folder named `mlx` without MLX's library (MLX's own kernel cache
    `mlx/<version>` in the temp folder, any working directory's `mlx/`) is a namespace portion
    and is passed over, while a regular package or module named mlx hides everything after it."""
    for entry in sys.path:
        site = Path(entry or ".")
        library = site / "mlx" / "lib" / "libmlx.so"
        if library.is_file():
            return library
        if (site / "mlx" / "__init__.py").is_file() or any(
            (site / f"mlx{suffix}").is_file() for suffix in importlib.machinery.all_suffixes()
        ):
            return None
    return None


def _libgfortran_copies(mlx: Path | None) -> list[Path]:
    """The libgfortran copies that wheels ship under hashed names (`<wheel>.libs/`): those
    beside MLX's install (`mlx`, its library) first, then any other package's on sys.path
    (numpy's), so that a stand-in `mlx` does not leave the pip OpenBLAS without one."""
    sites = [mlx.parents[2]] if mlx is not None else []
    sites += [Path(entry) for entry in sys.path if entry and Path(entry).is_dir()]
    found: list[Path] = []
    for site in sites:
        for pattern in ("mlx*.libs/libgfortran*.so*", "*.libs/libgfortran*.so*"):
            found += [f for f in sorted(site.glob(pattern)) if f not in found]
    return found


def _write_whole(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd`; False when any write falls short for good (a file-size
    limit, RLIMIT_FSIZE, applies to a memfd too: a short copy must never be mapped)."""
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            if written <= 0:
                return False
            view = view[written:]
        return os.fstat(fd).st_size == len(data)
    except OSError:
        return False


@functools.cache  # one copy however many libraries ask for it
def _provide_libgfortran() -> bool:
    """Load a wheel's own libgfortran (shipped under a hashed name, MLX's first) under the
    name `libgfortran.so.5`, which the pip OpenBLAS asks for: a copy in memory with its
    DT_SONAME rewritten (same length or shorter; nothing is written to disk)."""
    fortran = _libgfortran_copies(mlx_library())
    if not fortran or not hasattr(os, "memfd_create"):
        return False
    for quadmath in sorted(fortran[0].parent.glob("libquadmath*.so*")):  # libgfortran needs it
        ctypes.CDLL(str(quadmath), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    data = bytearray(fortran[0].read_bytes())
    where = _soname_offset(bytes(data))
    name = b"libgfortran.so.5"
    if where is None or where[1] < len(name):
        return False
    start, length = where
    data[start : start + length] = name + b"\0" * (length - len(name))
    fd = os.memfd_create("libgfortran.so.5")  # stays open: the loader maps it
    if not _write_whole(fd, bytes(data)):
        os.close(fd)
        return False
    ctypes.CDLL(f"/proc/self/fd/{fd}", mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    return True


def _load(path: str) -> str | None:
    """Load `path` into the global scope (a missing libgfortran is provided once, then it is
    tried again); None when it loaded, else why not."""
    mode = os.RTLD_NOW | os.RTLD_GLOBAL
    try:
        ctypes.CDLL(path, mode=mode)
        return None
    except OSError as err:
        why = err
    if "libgfortran" in str(why):
        try:
            if _provide_libgfortran():
                ctypes.CDLL(path, mode=mode)
                return None
        except OSError as err:
            why = err
    return str(why)


def prefer_system_blas() -> str | None:
    """Load a fast BLAS into the global symbol scope, before mlx loads (see the module's
    docstring for the order). Returns the library path used, if any."""
    global _loaded_blas
    if _loaded_blas or sys.platform != "linux" or "mlx.core" in sys.modules:
        return _loaded_blas
    if mlx_library() is None:  # no MLX backend to speed up: require_mlx says so, in one line
        return None
    candidates = _candidates()
    policy, settings, notes = thread_policy(os.environ, usable_cores())
    for note in notes if candidates else []:
        print(note, file=sys.stderr)
    failed = []
    for path in candidates:
        with _environment(settings):  # read by OpenBLAS as it loads; put back for children
            why = _load(path)
        if why is None:
            _loaded_blas = path
            _threads.update(policy=policy, runs=local_runs(os.environ), settings=settings)
            if policy in ADAPTIVE and (setter := openblas_setter()):
                setter(1)  # one thread until the governor finds idle cores
            return path
        failed.append(f"{path} ({why})")
    if failed:  # one note, only when no fast library loaded
        print(
            f"note: could not load {'; nor '.join(failed)}; MLX keeps its bundled BLAS, "
            "which is slower",
            file=sys.stderr,
        )
    return None


def blas_library() -> str:
    """Which BLAS the CPU backend uses, for logs and benchmark reports."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return _loaded_blas or SLOW_BLAS


def _openblas(name: str):
    """The loaded OpenBLAS's function `name`, or None: no OpenBLAS loaded, or none by that
    name."""
    if not _loaded_blas:
        return None
    return getattr(ctypes.CDLL(_loaded_blas, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL), name, None)


def blas_threads() -> int | None:
    """The threads the loaded OpenBLAS computes with (as it reports), or None: no OpenBLAS."""
    count = _openblas("openblas_get_num_threads")
    return count() if count else None


def openblas_setter() -> Callable[[int], None] | None:
    """openblas_set_num_threads of the loaded OpenBLAS, or None where there is none."""
    setter = _openblas("openblas_set_num_threads")
    if setter is not None:
        setter.argtypes, setter.restype = [ctypes.c_int], None
    return setter


def pool_size() -> int:
    """The most threads the adaptive policy may compute on (the pool OpenBLAS loaded with);
    1 under any other policy."""
    if _threads.get("policy") not in ADAPTIVE:
        return 1
    return int(_threads.get("settings", {}).get("OPENBLAS_NUM_THREADS", "1"))


@functools.cache  # one governor a process
def start_governor() -> Governor | None:
    """Under the adaptive policy with a pool of more than one thread, start the daemon that
    keeps the count to the idle cores (Linux: it reads /proc/stat); None where there is none."""
    setter = openblas_setter()
    if pool_size() < 2 or setter is None or not Path("/proc/stat").is_file():
        return None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return Governor(setter, pool_size(), cpus).start() if cpus else None


def blas_line() -> str | None:
    """One line for the run's log: the OpenBLAS the CPU backend computes with, its threads
    and the policy that chose them; None where no OpenBLAS was loaded (macOS, or off)."""
    count = blas_threads()
    if count is None:
        return None
    policy = _threads.get("policy", "user")
    why = "the count you set" if policy == "user" else f"{THREADS_SETTING}={policy}"
    if pool_size() > 1:
        return (
            f"CPU BLAS: {_loaded_blas}, 1 to {pool_size()} threads, as many as the machine "
            f"leaves cores idle, {count} now ({why})"
        )
    return f"CPU BLAS: {_loaded_blas}, {count} thread{'s' * (count != 1)} ({why})"


def threads_note() -> str | None:
    """One line on the thread count, where the policy split the cores among runs on this
    machine (said by the first rank only, as every rank's own note would say the same)."""
    count = _threads.get("settings", {}).get("OPENBLAS_NUM_THREADS")
    ranks = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if (
        _threads.get("runs", 1) < 2
        or count is None
        or any(os.environ.get(key, "0") != "0" for key in ranks)
    ):
        return None
    return (
        f"note: OpenBLAS on {'at most ' * (_threads['policy'] in ADAPTIVE)}{count} "
        f"thread{'s' * (count != '1')} in each of the "
        f"{_threads['runs']} runs on this machine's {usable_cores()} cores "
        f"({THREADS_SETTING}={_threads['policy']}; OPENBLAS_NUM_THREADS sets a count)"
    )


@functools.cache  # one note however many times a command asks
def require_mlx() -> None:
    """Import mlx.core, or fail with one line that says which extra to install; then the
    thread governor and the thread note, where there are."""
    try:
        import mlx.core as mx

        mx.array(1.0) + 1  # a backend-less install fails here, not at import
    except (ImportError, OSError, RuntimeError) as err:
        raise UserError(f"{BACKEND_HINT} ({type(err).__name__}: {err})") from None
    start_governor()
    note = threads_note()
    if note:
        print(note, file=sys.stderr)
