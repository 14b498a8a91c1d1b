"""DeepSpeed's JIT-built CPU op, built once per host and never waited on forever.

On the CPU accelerator DeepSpeed builds ``deepspeed_shm_comm`` (shared-memory collectives)
with torch's JIT extension loader the first time a process creates its communication
backend, i.e. inside ``deepspeed.initialize`` on every training worker (1-2 minutes of
compiling on a fresh host). torch guards the build directory with a bare lock file
(``<dir>/lock``, created with O_EXCL, no owner, no timeout) that every later load waits on,
even of a finished build. A worker SIGKILLed while it holds that file (during the build, or
the sub-second load) leaves it behind, and every later worker on the host waits forever.

`ensure_ops` runs before ``deepspeed.initialize`` (rayalign.train.Trainer):

- it takes a kernel lock (``fcntl.flock`` on a sibling file) that the kernel releases when
  its holder dies, so it can never go stale; waiting for it is bounded by ``timeout_s``,
  past which a RuntimeError names the directory and the pid that holds it;
- under that lock a torch ``lock`` file with no compiler running in its directory (Linux:
  no process has it as working directory; torch runs ninja there) is a dead process's: it
  is removed, and so is the directory unless it is marked complete (``.rayalign-complete``).
  A ``.so`` without a lock is a finished build (torch releases its lock after each one);
- a missing build runs in a child process (its own session, killed past ``timeout_s``, so a
  hung compiler fails the start loudly too) in a fresh sibling directory that is renamed
  into place only when complete, so compilers orphaned by a killed worker can only write
  into a directory nobody reads (the next holder kills them and removes it); it is
  announced on stdout.
  The op is then loaded into this process, where DeepSpeed's own load finds it cached.

A non-rayalign process between taking torch's lock and starting ninja (a few milliseconds)
would be taken for a dead one. ``python -m rayalign.dsops`` builds the op ahead
of time: scripts/setup runs it, so the first training stage does not start by compiling.
On GPU hosts DeepSpeed's CUDA accelerator has no such op and this does nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BUILDERS = ("ShareMemCommBuilder",)
COMPLETE = ".rayalign-complete"  # marks a build directory renamed into place whole
_BUILD = ("from deepspeed.accelerator import get_accelerator; "
          "get_accelerator().create_op_builder({name!r}).load()")


def _jit_builders(names: Sequence[str]) -> list:
    """The op builders of `names` that this host would JIT-build (none on GPU accelerators,
    none that DeepSpeed was installed with prebuilt)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builders = [get_accelerator().create_op_builder(name) for name in names]
    return [b for b in builders if b is not None and not installed_ops.get(b.name, False)
            and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]


@contextmanager
def host_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """An exclusive `flock` on `path`, waited for at most `timeout_s` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise RuntimeError(
                        f"waited {timeout_s:.0f} s for {what}: process {holder} still holds "
                        f"{path} (building or hung); stop it or raise train.startup_timeout_s"
                    ) from None
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}@{os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_in_child(builder, build_dir: Path, timeout_s: float) -> None:
    """Build the op in a fresh sibling directory (a child process, killed past `timeout_s`)
    and rename it into place complete, with the `COMPLETE` marker."""
    print(f"rayalign: building DeepSpeed's {builder.name} op for {build_dir} (once per host, "
          f"1-2 min)", flush=True)
    root = build_dir.parent / f".build-{builder.name}-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", _BUILD.format(name=type(builder).__name__)],
                             env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
                             start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = child.communicate(timeout=timeout_s)
        if child.returncode != 0:
            raise RuntimeError(f"building DeepSpeed's {builder.name} op failed:\n{out[-4000:]}")
        (root / builder.name / COMPLETE).touch()
        shutil.rmtree(build_dir, ignore_errors=True)
        os.rename(root / builder.name, build_dir)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise RuntimeError(f"building DeepSpeed's {builder.name} op took over {timeout_s:.0f} s; "
                           f"raise train.startup_timeout_s") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _working_in(directory: Path) -> list[int]:
    """PIDs of live processes whose working directory is `directory` (torch runs ninja, and
    ninja the compilers, in the build directory); Linux /proc, none elsewhere."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == str(directory) or cwd.startswith(f"{directory}/"):
            pids.append(int(proc.name))
    return pids


def _remove_half_builds(build_dir: Path, name: str) -> None:
    """Under the host lock: a `.build-*` directory is a dead holder's; its orphaned
    compilers (working there) are killed and it is removed."""
    for stale in build_dir.parent.glob(f".build-{name}-*"):
        for pid in _working_in(stale):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(stale, ignore_errors=True)


def _clear_stale_lock(build_dir: Path, deadline: float) -> None:
    """Under the host lock: wait (to `deadline`) while a compiler still runs in `build_dir`,
    then treat torch's leftover lock as a dead process's and remove it, with the directory
    unless it is a complete build (torch releases its lock after every finished build)."""
    lock = build_dir / "lock"
    while lock.exists() and _working_in(build_dir):  # e.g. a non-rayalign build right now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{lock} is held by a build that is still running; waited "
                               f"train.startup_timeout_s")
        time.sleep(1.0)
    if not lock.exists():
        return
    complete = (build_dir / COMPLETE).exists()
    print(f"rayalign: removing {lock}, left by a killed process"
          + ("" if complete else "; rebuilding its half-built op"), flush=True)
    lock.unlink()
    if not complete:
        shutil.rmtree(build_dir)


def ensure_ops(timeout_s: float, names: Sequence[str] = BUILDERS) -> None:
    """Build (once per host) and load the JIT ops of `names` without ever waiting forever."""
    from torch.utils.cpp_extension import _get_build_directory

    deadline = time.monotonic() + timeout_s
    for builder in _jit_builders(names):
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        with host_lock(build_dir.parent / f".{builder.name}.rayalign-lock", timeout_s,
                       f"DeepSpeed's {builder.name} op"):
            _remove_half_builds(build_dir, builder.name)
            _clear_stale_lock(build_dir, deadline)
            if not (build_dir / f"{builder.name}.so").exists():
                _build_in_child(builder, build_dir, max(deadline - time.monotonic(), 1.0))
            builder.load()


if __name__ == "__main__":
    ensure_ops(float(sys.argv[1]) if len(sys.argv) > 1 else 1800.0)
