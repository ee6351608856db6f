"""Run one untrusted grading worker under bubblewrap, with limits for its whole tree.

    run_worker(stub_dir, job_bytes, key, limits, sandbox=True) -> dict

The worker (gptcourse/grading_worker.py, copied into stub_dir with a stub
`gptcourse` package) runs as:

    bwrap --unshare-all --unshare-user --uid 65534 --gid 65534 --die-with-parent
          --new-session --clearenv   (user nobody; own PID, network (none), mount,
                                      IPC, UTS and cgroup namespaces; no capabilities)
          --ro-bind /usr ... --ro-bind <python and its site-packages>   (read-only system)
          --ro-bind stub_dir /grader                                    (worker + stub package)
          --tmpfs /tmp --tmpfs /home/student   (private, size-capped, gone afterwards)
          python -E -s /grader/grading_worker.py

Nothing else of the host is visible: not the submissions folder, not the
other students' workers (their own PID namespaces), not the grader's files,
the solutions or the course's sources (a `gptcourse` folder in site-packages
is hidden under an empty tmpfs).

Limits for the whole tree: a memory cgroup (memory.limit_in_bytes, swap
included where the kernel accounts it) and a pids cgroup (pids.max, which
counts threads too), created under the grader's own cgroups (v1) when it may
write there; otherwise RLIMIT_AS per process (recorded as "rlimit"). A
wall-clock limit kills the whole tree (bwrap's process group; the PID
namespace dies with its first process), stdout and stderr are kept to their
last 64 KB, and the result channel is capped at 256 MB.

With sandbox=False (the instructor's explicit --unsafe-no-sandbox) the worker
runs as a plain child process with the same limits where possible.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

OUTPUT_KEEP = 64 * 1024
RESULT_CAP = 256 * 1024 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"


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
    namespaces here (a kernel or a container may forbid user namespaces)."""
    bwrap = find_bwrap()
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent",
           "--new-session", "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev"]
    for link in ("/bin", "/lib", "/lib64"):
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            cmd += ["--ro-bind", link, link]
    try:
        run = subprocess.run(cmd + ["true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap could not be started: {e}") from e
    if run.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap is installed but cannot create its sandbox here ({run.stderr.strip()[:300]}); "
            "grade on a machine that allows user namespaces, or, only for code you trust, pass "
            "--unsafe-no-sandbox")
    return bwrap


def _own_cgroup(controller):
    """The folder of this process's cgroup for a v1 controller, or None."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    folder = os.path.join(CGROUP_ROOT, controller, path.lstrip("/"))
                    return folder if os.access(folder, os.W_OK) else None
    except OSError:
        pass
    return None


def make_cgroups(memory_mb, max_tasks):
    """Create a memory and a pids cgroup for one worker; returns their folders
    (empty list when cgroups cannot be used here)."""
    if memory_mb <= 0 or max_tasks <= 0:
        raise ValueError(f"memory_mb and max_tasks must be positive, got {memory_mb} and {max_tasks}")
    name = f"gptcourse-grading-{uuid.uuid4().hex[:12]}"
    folders = []
    try:
        memory, pids = _own_cgroup("memory"), _own_cgroup("pids")
        if memory is None or pids is None:
            return []
        for parent in (memory, pids):
            folder = os.path.join(parent, name)
            os.mkdir(folder)
            folders.append(folder)
        limit = str(memory_mb * 1024 * 1024)
        _write(os.path.join(folders[0], "memory.limit_in_bytes"), limit)
        swap = os.path.join(folders[0], "memory.memsw.limit_in_bytes")
        if os.path.exists(swap):
            _write(swap, limit)
        _write(os.path.join(folders[1], "pids.max"), str(max_tasks))
        return folders
    except OSError:
        remove_cgroups(folders)
        return []


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _tasks(folder):
    try:
        with open(os.path.join(folder, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill_cgroups(folders):
    """SIGKILL every process left in the cgroups."""
    for _ in range(50):
        pids = {p for folder in folders for p in _tasks(folder)}
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def oom_killed(folders):
    """True when the memory cgroup's limit was hit and a process was killed for it."""
    for folder in folders:
        path = os.path.join(folder, "memory.oom_control")
        if os.path.exists(path):
            with open(path) as f:
                fields = dict(line.split() for line in f if line.strip())
            if int(fields.get("oom_kill", 0)) > 0:
                return True
            with open(os.path.join(folder, "memory.failcnt")) as f:
                return int(f.read()) > 0 and int(fields.get("under_oom", 0)) > 0
    return False


def remove_cgroups(folders):
    kill_cgroups(folders)
    for folder in folders:
        for _ in range(50):
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


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


def bwrap_command(bwrap, stub_dir, memory_mb, tmp_mb=256):
    """The bubblewrap command line that runs the worker in stub_dir."""
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
           "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            cmd += ["--ro-bind", link, link]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    # the private /tmp first: a Python or virtual environment that lives under /tmp
    # (a CI checkout, say) is then bound on top of it, not hidden by it
    size = str(tmp_mb * 1024 * 1024)
    cmd += ["--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/home/student"]
    for path in _python_binds():
        cmd += ["--ro-bind", path, path]
        package = os.path.join(path, "gptcourse")
        for folder in [package] + [os.path.join(path, d, "gptcourse") for d in ("lib",)]:
            if os.path.isdir(folder):
                cmd += ["--tmpfs", folder]          # the course's sources stay out of reach
    import site
    for sp in site.getsitepackages():
        if os.path.isdir(os.path.join(sp, "gptcourse")):
            cmd += ["--tmpfs", os.path.join(sp, "gptcourse")]
    cmd += ["--ro-bind", stub_dir, "/grader", "--proc", "/proc", "--dev", "/dev",
            "--chdir", "/home/student"]
    env = {"HOME": "/home/student", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "GPTCOURSE_OFFLINE": "1",
           "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    return cmd + ["--", sys.executable, "-E", "-s", "/grader/grading_worker.py"]


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


def run_worker(stub_dir, job, timeout_s, memory_mb, max_tasks=16, sandbox=True, tmp_mb=256):
    """Run the worker on `job` (bytes for its stdin: header line + torch.save bytes,
    with "result_fd" left for this function to set). Never raises for what the
    worker does.

    Returns dict(result=bytes read from the result channel, returncode,
    timed_out, oom, stderr=last bytes, limits="cgroup"|"rlimit"|"none")."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    folders = make_cgroups(memory_mb, max_tasks) if memory_mb else []
    try:
        return _run(stub_dir, job, timeout_s, memory_mb, sandbox, tmp_mb, folders)
    finally:
        remove_cgroups(folders)                  # whatever happened, nothing of it keeps running


def _run(stub_dir, job, timeout_s, memory_mb, sandbox, tmp_mb, folders):
    result_r, result_w = os.pipe()
    job = job.replace(b'"result_fd": -1', f'"result_fd": {result_w}'.encode(), 1)
    if sandbox:
        cmd = bwrap_command(find_bwrap(), stub_dir, memory_mb, tmp_mb)
    else:
        cmd = [sys.executable, "-E", "-s", os.path.join(stub_dir, "grading_worker.py")]
    if folders:                                  # join the cgroups first, then become bwrap
        joiner = "; ".join(f"echo $$ > {os.path.join(f, 'cgroup.procs')}" for f in folders)
        cmd = ["/bin/sh", "-c", joiner + '; exec "$@"', "sh"] + cmd
    limits = "cgroup" if folders else ("rlimit" if memory_mb else "none")
    env = {"PATH": "/usr/bin:/bin", "HOME": stub_dir, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1", "GPTCOURSE_OFFLINE": "1", "LANG": "C.UTF-8"}
    # per process as well: a single huge allocation then fails with MemoryError in that
    # cell instead of the cgroup's OOM killer ending the whole notebook (virtual size: slack)
    job = job.replace(b'"rlimit_mb": 0', f'"rlimit_mb": {memory_mb + 2048 if memory_mb else 0}'.encode(), 1)
    cwd = stub_dir if not sandbox else "/"
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(result_w,), env=env, cwd=cwd, start_new_session=True)
    finally:
        os.close(result_w)
    outputs = {"stdout": {}, "stderr": {}, "result": {}}
    readers = [threading.Thread(target=_drain, args=(proc.stdout.fileno(), OUTPUT_KEEP, 0, outputs["stdout"])),
               threading.Thread(target=_drain, args=(proc.stderr.fileno(), OUTPUT_KEEP, 0, outputs["stderr"])),
               threading.Thread(target=_drain, args=(result_r, 0, RESULT_CAP, outputs["result"]))]
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
    kill_cgroups(folders)
    proc.wait()
    for t in readers:
        t.join(timeout=5)
    oom = oom_killed(folders)
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
