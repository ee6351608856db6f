"""gptcourse.grading.cgroups: cgroup v2 and v1 against fake trees (the files the module writes and
reads), and the real limits on this host's cgroups where it may make them (root here)."""
import os
import subprocess
import sys

import pytest

from gptcourse.grading import cgroups

MB = 1024 * 1024


class FakeKernel:
    """A cgroup file system stand-in under tmp_path: mkdir fills a new folder with the
    interface files the kernel would make (`files(path)` says which), rmdir removes those
    files first (like the kernel, it refuses a folder with sub-folders left in it).
    `/proc/self/cgroup` is a file whose text the test gives."""

    def __init__(self, tmp_path, monkeypatch, proc_text, files):
        self.root = tmp_path / "cgroup"
        self.root.mkdir()
        self.files = files
        self.proc = tmp_path / "proc_self_cgroup"
        self.set_proc(proc_text)
        monkeypatch.setattr(cgroups, "PROC_SELF_CGROUP", str(self.proc))
        real_mkdir, real_rmdir = os.mkdir, os.rmdir

        def mkdir(path, mode=0o777, *args, **kwargs):
            real_mkdir(path, mode, *args, **kwargs)
            if self.inside(path):
                self.populate(path)

        def rmdir(path, *args, **kwargs):
            if self.inside(path):
                for entry in os.scandir(path):
                    if not entry.is_dir(follow_symlinks=False):
                        os.unlink(entry.path)
            real_rmdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "rmdir", rmdir)

    def inside(self, path):
        return os.path.abspath(path).startswith(str(self.root) + os.sep)

    def set_proc(self, text):
        self.proc.write_text(text)

    def populate(self, path):
        for name, text in self.files(str(path)).items():
            (self.root / path / name).write_text(text)

    def folder(self, rel, **extra):
        """A cgroup that exists before the test (the grader's own one, say)."""
        path = self.root / rel
        path.mkdir(parents=True)
        self.populate(path)
        for name, text in extra.items():
            (path / name.replace("_", ".", 1)).write_text(text)
        return path


def v2_files(controllers="cpuset cpu io memory hugetlb pids", swap=True):
    def files(path):
        names = {"cgroup.procs": "", "cgroup.type": "domain\n", "cgroup.controllers": controllers + "\n",
                 "cgroup.subtree_control": "", "cgroup.kill": "", "memory.max": "max\n",
                 "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
                 "pids.max": "max\n"}
        if swap:
            names["memory.swap.max"] = "max\n"
        if "cpu" in controllers.split():
            names["cpu.max"] = "max 100000\n"
        return names
    return files


def read(path):
    return open(path).read().strip()


@pytest.fixture
def v2(tmp_path, monkeypatch):
    """A pure cgroup-v2 host; the grader (this process, as far as the files say) sits in
    /user.slice/grading.scope with no controllers enabled for its children yet."""
    def make(controllers="cpuset cpu io memory hugetlb pids", swap=True, procs=(os.getpid(),)):
        kernel = FakeKernel(tmp_path, monkeypatch, "0::/user.slice/grading.scope\n",
                            v2_files(controllers, swap))
        (kernel.root / "cgroup.controllers").write_text(controllers + "\n")
        kernel.own = kernel.folder("user.slice/grading.scope",
                                   cgroup_procs="".join(f"{p}\n" for p in procs))
        return kernel
    return make


def test_v2_limits_leaf_and_subtree_control(v2):
    kernel = v2()
    cg = cgroups.create(300, 12, cpu_cores=0.5, root=str(kernel.root))
    assert cg is not None and cg.kind == "cgroup v2" and cg.cpu_limited
    folder, = cg.folders
    assert os.path.dirname(folder) == str(kernel.own)
    assert os.path.basename(folder).startswith("gptcourse-worker-")
    assert cg.procs_files == [os.path.join(folder, "cgroup.procs")]
    assert read(os.path.join(folder, "memory.max")) == str(300 * MB)
    assert read(os.path.join(folder, "memory.swap.max")) == "0"
    assert read(os.path.join(folder, "pids.max")) == "12"
    assert read(os.path.join(folder, "cpu.max")) == "50000 100000"
    # the grader's cgroup held a process: it moved into the leaf before the controllers
    # (only those the kernel lists in cgroup.controllers) were enabled for the children
    assert read(kernel.own / "grader" / "cgroup.procs") == str(os.getpid())
    assert read(kernel.own / "cgroup.subtree_control") == "+memory +pids +cpu"
    assert not cg.oom_killed()
    (kernel.own / os.path.basename(folder) / "memory.events").write_text(
        "low 0\nhigh 0\nmax 41\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert cg.oom_killed()
    assert cg.kill() and read(os.path.join(folder, "cgroup.kill")) == "1"
    assert cg.remove() and not os.path.exists(folder)
    assert (kernel.own / "grader").is_dir()          # made once, kept for the next worker


def test_v2_second_worker_from_inside_the_leaf(v2):
    kernel = v2()
    first = cgroups.create(100, 4, root=str(kernel.root))
    # what the kernel now shows: the grader in the leaf, the controllers enabled above it
    kernel.set_proc("0::/user.slice/grading.scope/grader\n")
    (kernel.own / "cgroup.procs").write_text("")
    (kernel.own / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (kernel.own / "grader" / "cgroup.procs").write_text("999999\n")
    second = cgroups.create(100, 4, cpu_cores=2, root=str(kernel.root))
    assert os.path.dirname(second.folders[0]) == str(kernel.own)     # a sibling of the leaf, not below it
    assert read(os.path.join(second.folders[0], "cpu.max")) == "200000 100000"
    assert read(kernel.own / "cgroup.subtree_control") == "cpu memory pids"   # not rewritten
    assert read(kernel.own / "grader" / "cgroup.procs") == "999999"            # nobody moved again
    assert first.remove() and second.remove()


def test_v2_empty_cgroup_no_move_no_swap_no_cpu(v2):
    kernel = v2(controllers="memory pids", swap=False, procs=())
    cg = cgroups.create(64, 3, root=str(kernel.root))
    folder, = cg.folders
    assert not (kernel.own / "grader").exists()       # nothing to move out of an empty cgroup
    assert read(kernel.own / "cgroup.subtree_control") == "+memory +pids"
    assert not os.path.exists(os.path.join(folder, "memory.swap.max"))
    assert not os.path.exists(os.path.join(folder, "cpu.max"))
    assert not cg.cpu_limited and "cpu" in cg.note
    kind, why = cgroups.probe(root=str(kernel.root))
    assert kind == "cgroup v2" and "no CPU limit" in why
    assert cg.remove()


def test_v2_cpu_refused_keeps_memory_and_pids(v2, monkeypatch):
    kernel = v2()
    real = cgroups._write

    def write(path, text):            # as with a realtime process in the way of the cpu controller
        if path.endswith("cgroup.subtree_control") and "+cpu" in text:
            raise OSError(22, "Invalid argument")
        real(path, text)
    monkeypatch.setattr(cgroups, "_write", write)
    cg = cgroups.create(64, 4, root=str(kernel.root))
    assert read(kernel.own / "cgroup.subtree_control") == "+memory +pids"
    assert not cg.cpu_limited and "cpu controller not available" in cg.note
    assert read(os.path.join(cg.folders[0], "cpu.max")) == "max 100000"        # left alone
    assert read(os.path.join(cg.folders[0], "pids.max")) == "4"
    assert cg.remove()


def test_v2_not_writable_or_no_memory_controller(v2, monkeypatch):
    kernel = v2()
    real = cgroups._writable
    # as an ordinary user outside a delegated subtree (root here would pass any mode bits)
    monkeypatch.setattr(cgroups, "_writable", lambda p: False if str(kernel.own) in p else real(p))
    assert cgroups.create(64, 4, root=str(kernel.root)) is None
    kind, why = cgroups.probe(root=str(kernel.root))
    assert kind is None
    assert "not writable" in why and "systemd-run --user --scope -p Delegate=yes" in why and "as root" in why
    assert not any(n.startswith("gptcourse-worker-") or n == "grader" for n in os.listdir(kernel.own))
    monkeypatch.setattr(cgroups, "_writable", real)
    (kernel.own / "cgroup.controllers").write_text("cpu io pids\n")
    kind, why = cgroups.probe(root=str(kernel.root))
    assert kind is None and "memory not available" in why


def test_v2_refused_write_leaves_nothing(v2, monkeypatch, tmp_path):
    kernel = v2()
    files = kernel.files

    def broken(path):                 # pids.max cannot be written (a link to nowhere)
        names = files(path)
        names.pop("pids.max")
        return names
    kernel.files = broken
    real_populate = kernel.populate

    def populate(path):
        real_populate(path)
        if os.path.basename(path).startswith("gptcourse-worker-"):
            os.symlink(tmp_path / "nowhere" / "pids.max", os.path.join(path, "pids.max"))
    kernel.populate = populate
    assert cgroups.create(64, 4, root=str(kernel.root)) is None
    assert not any(n.startswith("gptcourse-worker-") for n in os.listdir(kernel.own))
    assert "cannot set the limits" in cgroups.probe(root=str(kernel.root))[1]


def test_no_cgroup_fs(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "PROC_SELF_CGROUP", str(tmp_path / "missing"))
    assert cgroups.probe(root=str(tmp_path))[0] is None
    proc = tmp_path / "proc"
    proc.write_text("0::/\n")
    monkeypatch.setattr(cgroups, "PROC_SELF_CGROUP", str(proc))
    kind, why = cgroups.probe(root=str(tmp_path / "none"))
    assert kind is None and "no cgroup file system" in why
    kind, why = cgroups.probe(root=str(tmp_path))
    assert kind is None and "cgroup v2: not mounted" in why and "no memory hierarchy" in why


def test_v1_fake_limits(tmp_path, monkeypatch):
    def files(path):
        names = {"cgroup.procs": ""}
        if "/memory/" in path:
            names.update({"memory.limit_in_bytes": "9223372036854771712\n",
                          "memory.memsw.limit_in_bytes": "9223372036854771712\n",
                          "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
                          "memory.failcnt": "0\n"})
        if "/pids/" in path:
            names["pids.max"] = "max\n"
        if "/cpu,cpuacct/" in path:
            names.update({"cpu.cfs_period_us": "250000\n", "cpu.cfs_quota_us": "-1\n"})
        return names
    kernel = FakeKernel(tmp_path, monkeypatch,
                        "9:name=systemd:/\n8:pids:/g\n4:memory:/m/g\n2:cpu,cpuacct:/\n0::/\n", files)
    for rel in ("memory/m/g", "pids/g", "cpu,cpuacct"):
        kernel.folder(rel)
    cg = cgroups.create(256, 8, cpu_cores=0.25, root=str(kernel.root))
    assert cg.kind == "cgroup v1" and cg.cpu_limited
    memory, pids, cpu = cg.folders
    assert memory.startswith(str(kernel.root / "memory/m/g" / "gptcourse-worker-"))
    assert pids.startswith(str(kernel.root / "pids/g" / "gptcourse-worker-"))
    assert cpu.startswith(str(kernel.root / "cpu,cpuacct" / "gptcourse-worker-"))
    assert cg.procs_files == [os.path.join(f, "cgroup.procs") for f in cg.folders]
    assert read(os.path.join(memory, "memory.limit_in_bytes")) == str(256 * MB)
    assert read(os.path.join(memory, "memory.memsw.limit_in_bytes")) == str(256 * MB)
    assert read(os.path.join(pids, "pids.max")) == "8"
    assert read(os.path.join(cpu, "cpu.cfs_quota_us")) == "62500"          # a quarter of its 250 ms period
    assert not cg.oom_killed()
    with open(os.path.join(memory, "memory.oom_control"), "w") as f:
        f.write("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.oom_killed()
    assert cg.remove() and not any(os.path.exists(f) for f in cg.folders)


@pytest.mark.parametrize("kwargs, bad", [
    (dict(memory_mb=0, max_tasks=8), "memory_mb must be a positive integer, got 0"),
    (dict(memory_mb=2.5, max_tasks=8), "memory_mb must be a positive integer, got 2.5"),
    (dict(memory_mb=64, max_tasks=-1), "max_tasks must be a positive integer, got -1"),
    (dict(memory_mb=64, max_tasks=8, cpu_cores=0), "cpu_cores must be a positive number, got 0"),
    (dict(memory_mb=64, max_tasks=8, cpu_cores=float("nan")), "cpu_cores must be a positive number, got nan"),
])
def test_inputs_checked(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        cgroups.create(**kwargs)


# ---------------------------------------------------------------- this host, for real

def _real(memory_mb, max_tasks, cpu_cores=1.0):
    cg = cgroups.create(memory_mb, max_tasks, cpu_cores)
    if cg is None:
        pytest.skip(f"cannot make cgroups on this host as uid {os.geteuid()} (needs root, or a "
                    f"delegated cgroup-v2 subtree): {cgroups.probe()[1]}")
    return cg


def _run_in(cg, code, timeout=60):
    """Run `python -c code` the way the sandbox starts a worker: a shell that writes its
    own pid into every cgroup.procs file, then execs the command."""
    joiner = "; ".join(f"echo $$ > {f}" for f in cg.procs_files)
    cmd = ["/bin/sh", "-c", joiner + '; exec "$@"', "sh", sys.executable, "-S", "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def real():
    made = []

    def make(*args):
        made.append(_real(*args))
        return made[-1]
    yield make
    for cg in made:
        cg.remove()


def test_real_memory_limit_kills(real):
    cg = real(256, 8)
    run = _run_in(cg, "b = b'x' * (600 << 20); print('survived')")
    assert run.returncode == -9 and "survived" not in run.stdout, (run.returncode, run.stdout, run.stderr)
    assert cg.oom_killed()
    assert cg.remove() and not any(os.path.exists(f) for f in cg.folders)


def test_real_memory_within_limit(real):
    cg = real(256, 8)
    run = _run_in(cg, "b = b'x' * (100 << 20); print('survived')")
    assert run.returncode == 0 and "survived" in run.stdout, run.stderr
    assert not cg.oom_killed()


FORKS = """
import os, time
ok = failed = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:                  # a child: let go of the pipes, then wait to be killed
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        time.sleep(60)
        os._exit(0)
    ok += 1
print(ok, failed)
"""


def test_real_task_limit(real):
    cg = real(256, 8)
    run = _run_in(cg, FORKS)
    ok, failed = map(int, run.stdout.split())
    assert ok + failed == 20 and 1 <= ok <= 7 and failed >= 13, (ok, failed)   # 8 tasks with the parent
    left = cg.pids()
    assert len(left) == ok                       # the sleeping children, still in the cgroup
    assert cg.remove() and not any(os.path.exists(f) for f in cg.folders)
    for pid in left:                             # killed (gone, or a zombie waiting for its reaper)
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split(")")[-1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            pass


BUSY = """
import os, time
t0 = time.monotonic()
while time.monotonic() - t0 < 1.0:
    pass
t = os.times()
print(t.user + t.system)
"""


def _throttled(cg):
    """How many CFS periods the cgroup's CPU quota ran out in (cpu.stat nr_throttled)."""
    folder = next(f for f in cg.folders if os.path.exists(os.path.join(f, "cpu.cfs_quota_us"))) \
        if cg.kind == "cgroup v1" else cg.folders[0]
    with open(os.path.join(folder, "cpu.stat")) as f:
        return int(dict(line.split() for line in f)["nr_throttled"])


def test_real_cpu_limit(real):
    full, half = real(256, 8, 1.0), real(256, 8, 0.5)
    if not (full.cpu_limited and half.cpu_limited):
        pytest.skip(f"no CPU limit on this host: {half.note}")
    cpu_full = float(_run_in(full, BUSY).stdout)
    cpu_half = float(_run_in(half, BUSY).stdout)
    # 1 s of wall time: about 1 s of CPU time at 1 core (less on a loaded host: loose),
    # about 0.5 s at half a core (the quota is given per 100 ms period: within a period)
    assert cpu_full > 0.4, cpu_full
    assert 0.2 < cpu_half < 0.65, cpu_half
    # 0.4 s or more of CPU time in ten 100 ms periods of 50 ms each: the quota ran out in
    # some of them (the kernel counts them); less, and the host's load held it back first
    assert _throttled(half) > 0 or cpu_half < 0.4, (_throttled(half), cpu_half)
