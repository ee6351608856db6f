"""One grading worker's cgroup: memory, task and CPU limits for its whole process tree,
on cgroup v2 or cgroup v1, as root or as an ordinary user in a delegated v2 subtree.

    cg = create(memory_mb=2048, max_tasks=16, cpu_cores=1.0)   # None where no limits can be set
    cmd = ["/bin/sh", "-c", "; ".join(f"echo $$ > {f}" for f in cg.procs_files) + '; exec "$@"',
           "sh", *worker_command]                               # the child joins, then becomes the worker
    ...
    cg.kill(); oom = cg.oom_killed(); cg.remove()
    kind, why = probe()                                         # what this host gives, or how to fix it

cgroup v2 (the unified hierarchy; `/proc/self/cgroup` has a `0::/path` line and the
hierarchy is mounted at `<root>` or, on hybrid hosts, at `<root>/unified`):
  - The grader's own cgroup `<mount><path>` must be writable: the grader runs as root,
    or as an ordinary user in a delegated subtree (e.g. started with
    `systemd-run --user --scope -p Delegate=yes <grader command>`).
  - "No internal process constraint": a non-root cgroup can enable domain controllers
    in `cgroup.subtree_control` only while it holds no processes. So when the grader's
    cgroup holds processes and lacks memory/pids/cpu in `cgroup.subtree_control`, every
    process in it (the grader, and what it started there) is first moved into the leaf
    `<own>/grader` (made once; later calls find the grader there and use the parent),
    then `+memory +pids +cpu` (those of them listed in `cgroup.controllers`) is written
    to `<own>/cgroup.subtree_control`.
  - Each worker gets `<own>/gptcourse-worker-<random>` with `memory.max` (bytes),
    `memory.swap.max` = 0 (where the kernel has swap accounting), `pids.max`, and
    `cpu.max` = "$MAX $PERIOD" = "<cpu_cores * 100000> 100000" (microseconds).
  - `oom_killed()` reads the flat-keyed `memory.events` (`oom_kill` > 0, counted for
    the cgroup and its subtree); `kill()` writes "1" to `cgroup.kill` (Linux >= 5.14:
    SIGKILL to the whole subtree, safe against racing forks) and then SIGKILLs
    whatever `cgroup.procs` still lists.
  File formats: the kernel's "Control Group v2" documentation,
  Documentation/admin-guide/cgroup-v2.rst, https://docs.kernel.org/admin-guide/cgroup-v2.html
  (sections "Controlling Controllers", "No Internal Process Constraint", "Delegation",
  "Core Interface Files": cgroup.kill; "CPU": cpu.max; "Memory": memory.max, memory.events,
  memory.swap.max; "PID": pids.max).

cgroup v1 (one hierarchy per controller, `<root>/<controller><path>` from the
`N:controller:/path` lines of `/proc/self/cgroup`; root only in practice): a child of the
grader's own memory cgroup (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes`
= the same where the kernel accounts swap, so swap does not add to it), of its pids cgroup
(`pids.max`) and of its cpu cgroup (`cpu.cfs_quota_us` = cpu_cores * `cpu.cfs_period_us`).
`oom_killed()` reads `memory.oom_control` (`oom_kill`, Linux >= 4.13; before that
`memory.failcnt` with `under_oom`). Documentation/admin-guide/cgroup-v1/memory.rst,
pids.rst and Documentation/scheduler/sched-bwc.rst.

Memory and pids are required: without both, `create` returns None (and `probe` says why
and how to fix it). The CPU limit is best effort: where the cpu controller is missing or
refuses the value, the worker gets the other two and `cpu_limited` is False (`note` says
why). Every write is checked; a half-made cgroup is removed before `create` returns None.
`root` (and the module constant PROC_SELF_CGROUP) let tests point the module at a fake tree.
"""
import errno
import math
import os
import signal
import threading
import time
import uuid

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
V2 = "cgroup v2"
V1 = "cgroup v1"
LEAF = "grader"                     # the v2 leaf the grader's own processes move into
PREFIX = "gptcourse-worker-"
CFS_PERIOD_US = 100000
MIN_QUOTA_US = 1000                 # the kernel refuses a CFS quota below 1 ms
FIX = ("run the grader as root, or, on a cgroup-v2 host, start it in a delegated cgroup: "
       "systemd-run --user --scope -p Delegate=yes <grader command>")

_setup_lock = threading.Lock()      # one thread at a time rearranges the grader's own cgroup


class WorkerCgroup:
    """The cgroup(s) of one graded notebook's worker.

    kind: "cgroup v2" or "cgroup v1"; folders: the cgroup folders (one for v2; memory, pids
    and, where limited, cpu for v1); procs_files: the `cgroup.procs` files a starting child
    writes its pid into; cpu_limited: whether a CPU limit is set; note: why not, if not."""

    def __init__(self, kind, folders, cpu_limited, note=""):
        self.kind = kind
        self.folders = list(folders)
        self.procs_files = [os.path.join(f, "cgroup.procs") for f in self.folders]
        self.cpu_limited = cpu_limited
        self.note = note

    def __repr__(self):
        return f"WorkerCgroup({self.kind!r}, {self.folders!r}, cpu_limited={self.cpu_limited})"

    def pids(self):
        """The processes now in the cgroup(s) and any cgroups below them."""
        found = set()
        for folder in self.folders:
            for sub, _, _ in os.walk(folder):
                found.update(_read_pids(os.path.join(sub, "cgroup.procs")))
        return found

    def kill(self, tries=100):
        """SIGKILL every process in it, repeating (at most `tries` rounds, 20 ms apart)
        until none is left. Returns True when it is empty."""
        if self.kind == V2:
            path = os.path.join(self.folders[0], "cgroup.kill")
            if os.path.exists(path):
                try:
                    _write(path, "1")
                except OSError:
                    pass
        for _ in range(tries):
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)
        return not self.pids()

    def oom_killed(self):
        """True when the memory limit was hit and the kernel killed a process for it."""
        try:
            if self.kind == V2:
                return _flat_keyed(os.path.join(self.folders[0], "memory.events")).get("oom_kill", 0) > 0
            memory = self.folders[0]
            fields = _flat_keyed(os.path.join(memory, "memory.oom_control"))
            if "oom_kill" in fields:
                return fields["oom_kill"] > 0
            return int(_read(os.path.join(memory, "memory.failcnt"))) > 0 and fields.get("under_oom", 0) > 0
        except (OSError, ValueError):
            return False

    def remove(self, tries=50):
        """Kill what is left, then remove the folder(s), deepest first, retrying each
        rmdir up to `tries` times 50 ms apart (a dying process can hold it briefly).
        Never raises; returns True when nothing of it is left."""
        try:
            self.kill()
        except Exception:
            pass
        for folder in self.folders:
            try:
                subs = [sub for sub, _, _ in os.walk(folder, topdown=False)]
            except Exception:
                subs = [folder]
            for sub in subs:
                _rmdir(sub, tries)
        return not any(os.path.exists(f) for f in self.folders)


def create(memory_mb: int, max_tasks: int, cpu_cores: float = 1.0, root=CGROUP_ROOT):
    """A new cgroup for one worker: at most `memory_mb` MiB of memory (no swap on top),
    `max_tasks` tasks (processes and threads), `cpu_cores` CPUs of time (0.5: half of one
    core). Returns a WorkerCgroup, or None where this host or user cannot set memory and
    pids limits (probe() says why). Tries cgroup v2 first, then v1."""
    return _create(memory_mb, max_tasks, cpu_cores, root)[0]


def probe(root=CGROUP_ROOT):
    """(kind, why): what create() gives on this host ("cgroup v2", "cgroup v1", or None)
    and, in words, what is limited, or why nothing is and how to fix it. It makes a real
    test cgroup and removes it again."""
    cg, why = _create(64, 4, 1.0, root)
    if cg is not None:
        cg.remove()
        return cg.kind, why
    return None, why


def _check(memory_mb, max_tasks, cpu_cores):
    for name, value in (("memory_mb", memory_mb), ("max_tasks", max_tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(cpu_cores, bool) or not isinstance(cpu_cores, (int, float)) \
            or not math.isfinite(cpu_cores) or cpu_cores <= 0:
        raise ValueError(f"cpu_cores must be a positive number, got {cpu_cores!r}")


def _create(memory_mb, max_tasks, cpu_cores, root):
    _check(memory_mb, max_tasks, cpu_cores)
    try:
        lines = _read(PROC_SELF_CGROUP).splitlines()
    except OSError as e:
        return None, f"no cgroup limits: cannot read {PROC_SELF_CGROUP} ({e}); {FIX}"
    if not os.path.isdir(root):
        return None, f"no cgroup limits: no cgroup file system at {root}; {FIX}"
    reasons = []
    for make in (_create_v2, _create_v1):
        try:
            cg, why = make(lines, memory_mb, max_tasks, cpu_cores, root)
        except OSError as e:              # anything unforeseen: the makers clean up after themselves
            cg, why = None, f"{'cgroup v2' if make is _create_v2 else 'cgroup v1'}: {e}"
        if cg is not None:
            return cg, why + "".join(f"; not used: {r}" for r in reasons)
        reasons.append(why)
    return None, "no cgroup limits: " + "; ".join(reasons) + f". To fix: {FIX}"


# ---------------------------------------------------------------- cgroup v2

def _create_v2(lines, memory_mb, max_tasks, cpu_cores, root):
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None, f"cgroup v2: {PROC_SELF_CGROUP} has no '0::' line"
    mount = next((m for m in (root, os.path.join(root, "unified"))
                  if os.path.exists(os.path.join(m, "cgroup.controllers"))), None)
    if mount is None:
        return None, f"cgroup v2: not mounted at {root} or {root}/unified"
    own = os.path.normpath(os.path.join(mount, path.lstrip("/")))
    base = own
    parent = os.path.dirname(own)
    if os.path.basename(own) == LEAF and parent.startswith(mount) and _writable(parent) \
            and {"memory", "pids"} <= _words(os.path.join(parent, "cgroup.subtree_control")):
        base = parent                     # the grader moved itself into <base>/grader before
    for target in (base, os.path.join(base, "cgroup.procs"), os.path.join(base, "cgroup.subtree_control")):
        if not _writable(target):
            return None, (f"cgroup v2: the grader's cgroup {target} is not writable by uid {os.geteuid()} "
                          "(not root and not a delegated subtree)")
    available = _words(os.path.join(base, "cgroup.controllers"))
    missing = [c for c in ("memory", "pids") if c not in available]
    if missing:
        return None, (f"cgroup v2: {' and '.join(missing)} not available in {base} (cgroup.controllers: "
                      f"{' '.join(sorted(available)) or 'none'}; on a hybrid host they belong to cgroup v1; "
                      "for a delegated subtree, the parent did not delegate them)")
    wanted = [c for c in ("memory", "pids", "cpu") if c in available]
    with _setup_lock:
        enabled = _words(os.path.join(base, "cgroup.subtree_control"))
        if not set(wanted) <= enabled:
            done, why = _enable(base, wanted)
            if not done:
                return None, why
            enabled |= set(done)          # the kernel enables all of one write or none
    folder = os.path.join(base, PREFIX + uuid.uuid4().hex[:12])
    try:
        os.mkdir(folder)
    except OSError as e:
        return None, f"cgroup v2: cannot create {folder}: {e}"
    try:
        _write(os.path.join(folder, "memory.max"), str(memory_mb * 1024 * 1024))
        swap = os.path.join(folder, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        _write(os.path.join(folder, "pids.max"), str(max_tasks))
    except OSError as e:
        WorkerCgroup(V2, [folder], False).remove()
        return None, f"cgroup v2: cannot set the limits in {folder}: {e}"
    cpu_limited, note = False, f"cpu controller not available in {base}"
    if "cpu" in enabled:
        try:
            _write(os.path.join(folder, "cpu.max"), f"{_quota(cpu_cores, CFS_PERIOD_US)} {CFS_PERIOD_US}")
            cpu_limited, note = True, ""
        except OSError as e:
            note = f"cpu.max not set: {e}"
    cg = WorkerCgroup(V2, [folder], cpu_limited, note)
    return cg, _limited(cg, base)


def _enable(base, wanted):
    """Enable `wanted` controllers for base's children, first moving base's own processes
    into the leaf base/grader where base is not the hierarchy's root (a root cgroup has
    no cgroup.type file and is exempt from the no-internal-process rule). Where the cpu
    controller is refused (a realtime process in the way, say), memory and pids alone.
    Returns (the controllers enabled, "") or ([], the error)."""
    procs = _read_pids(os.path.join(base, "cgroup.procs"))
    if procs and os.path.exists(os.path.join(base, "cgroup.type")):
        leaf = os.path.join(base, LEAF)
        try:
            os.makedirs(leaf, exist_ok=True)
        except OSError as e:
            return [], f"cgroup v2: cannot create the grader's leaf cgroup {leaf}: {e}"
        for pid in sorted(procs):
            try:
                _write(os.path.join(leaf, "cgroup.procs"), str(pid))
            except ProcessLookupError:    # it exited meanwhile
                pass
            except OSError as e:
                return [], f"cgroup v2: cannot move process {pid} from {base} into {leaf}: {e}"
    tries = [wanted] + ([[c for c in wanted if c != "cpu"]] if "cpu" in wanted else [])
    for controllers in tries:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), " ".join("+" + c for c in controllers))
            return controllers, ""
        except OSError as e:
            error = e
    busy = " (processes are still in it)" if getattr(error, "errno", None) == errno.EBUSY else ""
    return [], f"cgroup v2: cannot enable {' '.join(wanted)} in {base}/cgroup.subtree_control: {error}{busy}"


# ---------------------------------------------------------------- cgroup v1

def _v1_folder(lines, controller, root):
    """The grader's own v1 cgroup folder for `controller`, or None."""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or controller not in parts[1].split(","):
            continue
        for mount in (controller, parts[1]):   # cpu may be co-mounted as cpu,cpuacct
            folder = os.path.normpath(os.path.join(root, mount, parts[2].lstrip("/")))
            if os.path.isdir(folder):
                return folder
    return None


def _create_v1(lines, memory_mb, max_tasks, cpu_cores, root):
    parents = {c: _v1_folder(lines, c, root) for c in ("memory", "pids", "cpu")}
    for c in ("memory", "pids"):
        if parents[c] is None:
            return None, f"cgroup v1: no {c} hierarchy under {root} for this process"
        if not _writable(parents[c]):
            return None, f"cgroup v1: {parents[c]} is not writable by uid {os.geteuid()}"
    name = PREFIX + uuid.uuid4().hex[:12]
    made = []
    try:
        for c in ("memory", "pids"):
            made.append(os.path.join(parents[c], name))
            os.mkdir(made[-1])
        memory, pids = made
        limit = str(memory_mb * 1024 * 1024)
        _write(os.path.join(memory, "memory.limit_in_bytes"), limit)
        swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(swap):          # memory + swap together: swap adds nothing
            _write(swap, limit)
        _write(os.path.join(pids, "pids.max"), str(max_tasks))
    except OSError as e:
        WorkerCgroup(V1, [f for f in made if os.path.isdir(f)], False).remove()
        return None, f"cgroup v1: cannot set up {name}: {e}"
    cpu_limited, note = False, "no writable cpu hierarchy for this process"
    if parents["cpu"] is not None and _writable(parents["cpu"]):
        cpu = os.path.join(parents["cpu"], name)
        try:
            os.mkdir(cpu)
            made.append(cpu)
            try:
                period = int(_read(os.path.join(cpu, "cpu.cfs_period_us")))
            except (OSError, ValueError):
                period = CFS_PERIOD_US
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(_quota(cpu_cores, period)))
            cpu_limited, note = True, ""
        except OSError as e:
            if made[-1] == cpu:
                made.pop()
                _rmdir(cpu, 50)
            note = f"cpu limit not set: {e}"
    cg = WorkerCgroup(V1, made, cpu_limited, note)
    return cg, _limited(cg, ", ".join(parents[c] for c in ("memory", "pids", "cpu") if parents[c]))


# ---------------------------------------------------------------- helpers

def _limited(cg, where):
    what = ("memory, pids and cpu limits" if cg.cpu_limited
            else f"memory and pids limits (no CPU limit: {cg.note})")
    return f"{cg.kind}: {what} in a child cgroup of {where}"


def _quota(cpu_cores, period):
    return max(MIN_QUOTA_US, int(round(cpu_cores * period)))


def _writable(path):
    return os.access(path, os.W_OK)


def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    """Write `text` in one write(2); cgroup files report a refused value as an OSError
    from write or close, which is raised."""
    with open(path, "w") as f:
        f.write(text)


def _words(path):
    try:
        return set(_read(path).split())
    except OSError:
        return set()


def _read_pids(path):
    try:
        return {int(p) for p in _read(path).split()}
    except (OSError, ValueError):
        return set()


def _flat_keyed(path):
    fields = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            fields[parts[0]] = int(parts[1])
    return fields


def _rmdir(folder, tries):
    for _ in range(tries):
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
