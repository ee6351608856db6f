"""Run one untrusted grading worker under bubblewrap, with limits for its whole tree.

    run_worker(stub_dir, job_bytes, timeout_s, memory_mb, max_tasks=16, sandbox=True) -> dict

The worker (gptcourse/grading/worker.py, alone in stub_dir as grading_worker.py) runs as:

    bwrap --unshare-all --unshare-user --uid 65534 --gid 65534 --die-with-parent
          --new-session --clearenv --cap-drop ALL   (user nobody; own PID, network (none),
                                                     mount, IPC, UTS and cgroup namespaces)
          --ro-bind /usr ... --ro-bind <python and its site-packages>   (the system, read-only)
          --tmpfs /tmp --tmpfs /home/student   (private, sized, gone afterwards)
          --ro-bind stub_dir /grader --proc /proc --dev-bind <null zero full random urandom>
          --remount-ro /  --seccomp FD
          python -E -s /grader/grading_worker.py

Nothing else of the host is visible: not the submissions folder, not the
other students' workers (their own PID namespaces), not the grader's files,
the solutions or the course's sources (a `gptcourse` folder in site-packages
is hidden under an empty tmpfs). Every writable place is a sized tmpfs; the
root, /usr and /dev are read-only; there is no /dev/shm.

The seccomp filter (seccomp_filter(), built with libseccomp's bindings, loaded by
bubblewrap before the worker starts) refuses with EPERM every way of starting a
process other than a thread (fork, vfork, clone without CLONE_THREAD; clone3 gets
ENOSYS so the C library falls back to clone), new namespaces (unshare, setns),
ptrace and process_vm_readv/writev, bpf, keyctl, mount, sockets, io_uring and
the rest of DENIED_SYSCALLS.

Limits for the whole tree come from a cgroup (gptcourse/grading/cgroups.py: cgroup v2,
including a delegated subtree for an ordinary user, or v1): memory (no swap on
top), tasks (pids.max counts threads) and a CPU share (one core by default), so
one notebook cannot starve its neighbours. Where no cgroup can be made (an
ordinary user on a cgroup-v1 host), the worker is still one process (seccomp)
under RLIMIT_AS and RLIMIT_CPU in sized tmpfs ("rlimit+seccomp"). A wall-clock
limit kills the whole tree (bwrap's process group; the PID namespace dies with
its first process), stdout and stderr are kept to their last 64 KB, and the
result channel is read up to `result_cap` bytes.

With sandbox=False (the instructor's explicit --unsafe-no-sandbox) the worker
runs as a plain child process with the same limits where possible.
"""
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading

from . import cgroups

WORKER_NAME = "grading_worker.py"     # the worker's file in stub_dir, /grader in the sandbox
OUTPUT_KEEP = 64 * 1024
RESULT_CAP = 256 * 1024 * 1024


class SandboxUnavailable(RuntimeError):
    pass


def find_bwrap():
    """The bubblewrap executable, or raise SandboxUnavailable with what to do."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, so submissions cannot be isolated. Install it "
            "(Debian/Ubuntu: apt-get install bubblewrap) or, only for code you trust, pass "
            "--unsafe-no-sandbox (the CSV and JSON then record that no sandbox was used).")
    return path


def check_bwrap():
    """Raise SandboxUnavailable unless bubblewrap is installed AND can create its
    namespaces here (a kernel or a container may forbid user namespaces) AND
    load the seccomp filter (libseccomp installed)."""
    bwrap = find_bwrap()
    program = seccomp_filter()
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent",
           "--new-session", "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
           *_system_binds(("/bin", "/lib", "/lib64"))]
    filter_r = _pipe_holding(program)
    try:
        run = subprocess.run(cmd + ["--seccomp", str(filter_r), "true"], capture_output=True, text=True,
                             timeout=60, pass_fds=(filter_r,))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap could not be started: {e}") from e
    finally:
        os.close(filter_r)
    if run.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap is installed but cannot create its sandbox here ({run.stderr.strip()[:300]}); "
            "grade on a machine that allows user namespaces, or, only for code you trust, pass "
            "--unsafe-no-sandbox")
    return bwrap


# system calls a graded notebook never needs: new processes (threads are allowed),
# namespaces, other processes' memory, the kernel's keyrings, BPF and mounts, raw I/O
# rings, sockets (there is no network anyway), modules and clocks
DENIED_SYSCALLS = (
    "fork", "vfork", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "keyctl",
    "add_key", "request_key", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "fspick", "mount_setattr", "perf_event_open", "userfaultfd", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "socket", "socketpair", "name_to_handle_at", "open_by_handle_at", "kcmp", "pidfd_open",
    "pidfd_getfd", "pidfd_send_signal", "quotactl", "iopl", "ioperm", "personality", "lookup_dcookie", "vhangup")
CLONE_THREAD = 0x00010000


def _system_binds(folders):
    """bwrap arguments that show these system folders read-only (a symbolic link,
    as /bin -> usr/bin on merged-/usr systems, stays a link)."""
    args = []
    for folder in folders:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    return args


def _pipe_holding(data):
    """The read end of a pipe that holds `data` (small: the seccomp program) and then ends."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


@functools.lru_cache(maxsize=1)
def seccomp_filter():
    """The compiled seccomp filter (a BPF program, bytes) that bubblewrap loads with
    --seccomp before it starts the worker: DENIED_SYSCALLS fail with EPERM, clone
    fails unless it makes a thread (CLONE_THREAD), and clone3 reports ENOSYS (its
    flags sit in memory a filter cannot read; the C library then uses clone).
    Other architectures' system calls kill the process (libseccomp's default).
    Built once per process. Raises SandboxUnavailable without libseccomp."""
    import errno
    import tempfile
    try:
        import pyseccomp as sc
    except ImportError:
        try:
            import seccomp as sc                        # Debian's python3-seccomp: the same interface
        except ImportError:
            raise SandboxUnavailable(
                "libseccomp's Python bindings are missing, so the sandbox could not stop a submission from "
                "starting processes: pip install pyseccomp (or apt-get install python3-seccomp); or, only for "
                "code you trust, pass --unsafe-no-sandbox") from None
    try:
        rules = sc.SyscallFilter(sc.ALLOW)
        for name in DENIED_SYSCALLS:
            rules.add_rule(sc.ERRNO(errno.EPERM), name)
        rules.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        with tempfile.TemporaryFile() as f:
            rules.export_bpf(f)
            f.flush()
            f.seek(0)
            return f.read()
    except (OSError, RuntimeError, ValueError) as e:
        raise SandboxUnavailable(f"the seccomp filter could not be built ({e}); is libseccomp installed?") from e


def _python_binds():
    """Read-only binds for this Python and its packages (no gptcourse sources)."""
    import site
    import torch
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(torch.__file__))}
    paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
    real = sys.executable
    while os.path.islink(real):                 # the venv's python points into the base install
        target = os.readlink(real)
        real = target if os.path.isabs(target) else os.path.join(os.path.dirname(real), target)
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(real))))
    system = ("/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc")
    keep = sorted({p for p in paths if not p.startswith(system)})
    # a path inside another is already bound
    return [p for p in keep if not any(p != q and p.startswith(q + os.sep) for q in keep)]


DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def bwrap_command(bwrap, stub_dir, memory_mb, tmp_mb=256, seccomp_fd=None):
    """The bubblewrap command line that runs the worker in stub_dir. Every
    writable place is a size-capped tmpfs (/tmp and the home folder, tmp_mb
    each); the root and /dev (five device nodes, no /dev/shm) are read-only."""
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
           "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr", *_system_binds(("/bin", "/lib", "/lib64", "/sbin"))]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    # the private /tmp first: a Python or virtual environment that lives under /tmp
    # (a CI checkout, say) is then bound on top of it, not hidden by it
    size = str(tmp_mb * 1024 * 1024)
    cmd += ["--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/home/student"]
    for path in _python_binds():
        cmd += ["--ro-bind", path, path]
    import site
    for sp in site.getsitepackages() + [p for p in sys.path if p and os.path.isdir(p)]:
        if os.path.isdir(os.path.join(sp, "gptcourse")):     # the course's sources stay out of reach
            cmd += ["--size", "4096", "--tmpfs", os.path.join(sp, "gptcourse")]
    cmd += ["--ro-bind", stub_dir, "/grader", "--proc", "/proc"]
    for device in DEVICES:
        if os.path.exists(device):
            cmd += ["--dev-bind", device, device]
    cmd += ["--remount-ro", "/", "--chdir", "/home/student"]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    env = {"HOME": "/home/student", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "GPTCOURSE_OFFLINE": "1",
           "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    return cmd + ["--", sys.executable, "-E", "-s", "/grader/" + WORKER_NAME]


def _drain(stream, keep, cap, out):
    """Read a pipe to its end, keeping the last `keep` bytes (or the first `cap`)."""
    data, total = bytearray(), 0
    while True:
        try:
            chunk = os.read(stream, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        total += len(chunk)
        if cap:
            if len(data) < cap:
                data += chunk[:cap - len(data)]
        else:
            data += chunk
            del data[:-keep]
    out["data"], out["total"] = bytes(data), total


def run_worker(stub_dir, job, timeout_s, memory_mb, max_tasks=16, sandbox=True, tmp_mb=256, result_cap=RESULT_CAP,
               cpu_cores=1.0):
    """Run the worker on `job` (bytes for its stdin: header line + torch.save bytes,
    with "result_fd" left for this function to set). Never raises for what the
    worker does.

    Returns dict(result=bytes read from the result channel, returncode,
    timed_out, oom, stderr=last bytes, limits="cgroup v2"|"cgroup v1"|"rlimit+seccomp"|"rlimit"|"none")."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    cg = cgroups.create(memory_mb, max_tasks, cpu_cores) if memory_mb else None
    try:
        return _run(stub_dir, job, timeout_s, memory_mb, sandbox, tmp_mb, cg, result_cap)
    finally:
        if cg is not None:
            cg.remove()                          # whatever happened, nothing of it keeps running


def _run(stub_dir, job, timeout_s, memory_mb, sandbox, tmp_mb, cg, result_cap):
    result_r, result_w = os.pipe()
    job = job.replace(b'"result_fd": -1', f'"result_fd": {result_w}'.encode(), 1)
    passed = [result_w]
    if sandbox:
        filter_r = _pipe_holding(seccomp_filter())     # the seccomp program, read by bwrap
        passed.append(filter_r)
        cmd = bwrap_command(find_bwrap(), stub_dir, memory_mb, tmp_mb, seccomp_fd=filter_r)
    else:
        cmd = [sys.executable, "-E", "-s", os.path.join(stub_dir, WORKER_NAME)]
    if cg is not None:                           # join the cgroup(s) first, then become bwrap
        joiner = " && ".join(f"echo $$ > {f}" for f in cg.procs_files)
        cmd = ["/bin/sh", "-c", joiner + ' && exec "$@"', "sh"] + cmd
    # without a cgroup: one process (seccomp) under RLIMIT_AS and RLIMIT_CPU, in sized tmpfs
    limits = cg.kind if cg is not None else ("none" if not memory_mb else "rlimit+seccomp" if sandbox else "rlimit")
    env = {"PATH": "/usr/bin:/bin", "HOME": stub_dir, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1", "GPTCOURSE_OFFLINE": "1", "LANG": "C.UTF-8"}
    # per process as well: a single huge allocation then fails with MemoryError in that
    # cell instead of the cgroup's OOM killer ending the whole notebook (virtual size: slack)
    job = job.replace(b'"rlimit_mb": 0', f'"rlimit_mb": {memory_mb + 2048 if memory_mb else 0}'.encode(), 1)
    cwd = stub_dir if not sandbox else "/"
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=passed, env=env, cwd=cwd, start_new_session=True)
    finally:
        for fd in passed:
            os.close(fd)
    outputs = {"stdout": {}, "stderr": {}, "result": {}}
    readers = [threading.Thread(target=_drain, args=(proc.stdout.fileno(), OUTPUT_KEEP, 0, outputs["stdout"])),
               threading.Thread(target=_drain, args=(proc.stderr.fileno(), OUTPUT_KEEP, 0, outputs["stderr"])),
               threading.Thread(target=_drain, args=(result_r, 0, result_cap, outputs["result"]))]
    for t in readers:
        t.daemon = True
        t.start()
    writer = threading.Thread(target=_feed, args=(proc.stdin, job), daemon=True)
    writer.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:                                     # bwrap's group; its PID namespace dies with it
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    if cg is not None:
        cg.kill()
    proc.wait()
    for t in readers:
        t.join(timeout=5)
    oom = cg is not None and cg.oom_killed()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    os.close(result_r)
    return dict(result=outputs["result"].get("data", b""), returncode=proc.returncode, timed_out=timed_out,
                oom=oom, stderr=outputs["stderr"].get("data", b""), limits=limits,
                result_bytes=outputs["result"].get("total", 0))


def _feed(stdin, data):
    try:
        stdin.write(data)
        stdin.close()
    except OSError:
        pass
