"""The one place that pins every CPU kernel choice, so that the notebooks'
stored outputs come out bit for bit the same on any x86-64 host with AVX2,
Intel or AMD, AVX2 or AVX-512 (torch 2.13.0).

Every run that records or compares stored outputs uses it: `make outputs`,
`make test` (the exercises under nbval and the chapters in the Colab
simulation), `make book`; scripts/colab_sim.py puts it into its kernels.

    python scripts/pinned_cpu.py -- CMD ARGS...   run CMD under the pinned settings
    python scripts/pinned_cpu.py --show           print them and what a kernel sees

Why each setting (measured on torch 2.13.0's CPU wheel: oneMKL 2024.2,
oneDNN 3.12; see the book's appendix
"Same outputs on every CPU", chapters/appendix_same_outputs.md):

- ATEN_CPU_CAPABILITY=avx2: ATen compiles its vectorised kernels (softmax,
  exp, reductions, ...) for several instruction sets and picks the widest the
  CPU has; AVX-512 kernels add in another order. avx2 exists on every target.
- MKL_CBWR=AVX2,STRICT: oneMKL's conditional numerical reproducibility, pinned
  to its AVX2 branch (STRICT: also independent of alignment and threads).
  oneMKL honours a branch other than AUTO/COMPATIBLE only on Intel CPUs; on
  AMD it falls back to AUTO, whose products differ from Intel's AVX2 branch
  in the last bits. COMPATIBLE (SSE2) is the same on both vendors but made a
  chapter 2.4x slower. So on every host oneMKL is preloaded an answer "this
  is an Intel CPU" (scripts/mkl_intel_dispatch.c, built here with the C
  compiler) and AMD runs Intel's AVX2 branch.
- ONEDNN_MAX_CPU_ISA=AVX2: the same for oneDNN (used by a few ops, e.g. LSTM).
- One thread (OMP, MKL, OpenBLAS): a parallel sum adds in another order.
- OPENBLAS_CORETYPE=Haswell, NPY_DISABLE_CPU_FEATURES: numpy's OpenBLAS and
  numpy's own SIMD loops pick their kernels by CPU too.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM_SOURCE = ROOT / "scripts" / "mkl_intel_dispatch.c"

# The settings. Everything else in this file applies or checks them.
SETTINGS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "OPENBLAS_NUM_THREADS": "1",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
# What a kernel running under them must report (tests/test_pinned_cpu.py).
EXPECTED = {"cpu_capability": "AVX2", "threads": 1, "mkl_cnr": "AVX2,STRICT", "onednn_isa": "Intel AVX2"}


def shim_path():
    """The compiled preload library, built once per source version into
    _build/pinned_cpu/ (needs a C compiler: gcc or cc)."""
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    lib = ROOT / "_build" / "pinned_cpu" / f"libmkl_intel_dispatch-{digest}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if not cc:
            raise RuntimeError("pinned_cpu: no C compiler (gcc or cc) to build "
                               f"{SHIM_SOURCE.name}; install gcc")
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE)], check=True)
        os.replace(tmp, lib)
    return lib


def env(base=None):
    """`base` (default os.environ) with the pinned settings and the preload."""
    out = dict(os.environ if base is None else base)
    out.update(SETTINGS)
    lib = str(shim_path())
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p and "mkl_intel_dispatch" not in p]
    out["LD_PRELOAD"] = ":".join([lib] + preload)
    return out


def unpinned(base=None):
    """`base` (default os.environ) without the pinned settings and the preload
    (any other preloaded library is kept)."""
    out = {k: v for k, v in (os.environ if base is None else base).items() if k not in SETTINGS}
    preload = [p for p in out.pop("LD_PRELOAD", "").split(":") if p and "mkl_intel_dispatch" not in p]
    if preload:
        out["LD_PRELOAD"] = ":".join(preload)
    return out


def apply():
    """Pin this process's environment (for the processes it starts: kernels)."""
    os.environ.update(env())


def missing(environ=None):
    """The settings `environ` (default os.environ) lacks, as 'KEY=value' strings."""
    environ = os.environ if environ is None else environ
    bad = [f"{k}={v}" for k, v in SETTINGS.items() if environ.get(k) != v]
    if "mkl_intel_dispatch" not in environ.get("LD_PRELOAD", ""):
        bad.append("LD_PRELOAD=<mkl_intel_dispatch.so>")
    return bad


# Run inside a kernel (or any Python) to see what is in force there. Prints one
# JSON line. MKL and oneDNN report their branch and ISA on their own verbose
# output, written to the process's stdout file descriptor: captured through a pipe.
PROBE = r'''
import json, os, platform, sys, tempfile
import torch
def _c_stdout(fn):
    sys.stdout.flush()
    with tempfile.TemporaryFile() as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace")
def _mkl():
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        torch.ones(8, 8) @ torch.ones(8, 8)
def _onednn():
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        torch.nn.LSTM(4, 4)(torch.ones(2, 1, 4))
def _field(text, key, stop):
    for line in text.splitlines():
        if key in line:
            return line.split(key, 1)[1].split(stop)[0].strip()
    return None
mkl, dnn = _c_stdout(_mkl), _c_stdout(_onednn)
cpu = {}
try:
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        k = k.strip()
        if k in ("vendor_id", "model name", "cpu family", "model") and k not in cpu:
            cpu[k] = v.strip()
        if k == "flags" and "flags" not in cpu:
            cpu["flags"] = " ".join(f for f in v.split() if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"))
except OSError:
    pass
print(json.dumps({
    "cpu_model": cpu.get("model name", platform.processor()), "cpu_vendor": cpu.get("vendor_id"),
    "cpu_family_model": f'{cpu.get("cpu family")}/{cpu.get("model")}', "cpu_flags": cpu.get("flags"),
    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "threads": torch.get_num_threads(),
    "mkl_cnr": _field(mkl, "CNR:", " "), "mkl_banner": _field(mkl, "for Intel(R) 64 architecture", ","),
    "onednn_isa": _field(dnn, "cpu,isa:", "\n"),
    "settings": {k: os.environ.get(k) for k in %r},
    "ld_preload": os.environ.get("LD_PRELOAD"),
}))
''' % (sorted(SETTINGS),)


def probe(python=None, environ=None, cwd=None):
    """Run PROBE in `python` (default this one) with `environ`; returns its dict."""
    out = subprocess.run([str(python or sys.executable), "-c", PROBE], env=environ, cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"pinned_cpu probe failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def in_force(seen):
    """The differences between a probe's result and EXPECTED ([] when pinned)."""
    return [f"{k}: {seen.get(k)!r}, pinned {v!r}" for k, v in EXPECTED.items() if seen.get(k) != v]


def describe(seen):
    """A few lines on the host and what was in force, for a failure message."""
    problems = in_force(seen)
    return "\n".join([
        f"host: {seen['cpu_model']} ({seen['cpu_vendor']}, family/model {seen['cpu_family_model']}; "
        f"flags: {seen['cpu_flags']})",
        f"torch {seen['torch']}: CPU capability {seen['cpu_capability']}, {seen['threads']} thread(s), "
        f"oneMKL CNR {seen['mkl_cnr']} ({seen['mkl_banner']}), oneDNN ISA {seen['onednn_isa']}",
        "pinned settings: " + " ".join(f"{k}={v}" for k, v in sorted(seen["settings"].items())),
        ("all pinned settings in force" if not problems else
         "NOT in force (outputs are then expected to differ): " + "; ".join(problems)),
    ])


def recorded_on(notebook):
    """Where `notebook`'s stored outputs were recorded (scripts/execute_notebooks.py
    writes it into the notebook's metadata)."""
    try:
        meta = json.loads(Path(notebook).read_text()).get("metadata", {})
    except (OSError, ValueError):
        return "stored outputs recorded on: unknown"
    where = meta.get("gptcourse", {}).get("outputs_recorded_on")
    return f"stored outputs recorded on: {where or 'unknown'}"


def summary(seen):
    """One line on the host for a notebook's metadata."""
    return (f"{seen['cpu_model']} ({seen['cpu_vendor']} {seen['cpu_family_model']}), torch {seen['torch']}, "
            f"capability {seen['cpu_capability']}, oneMKL CNR {seen['mkl_cnr']}, oneDNN {seen['onednn_isa']}, "
            f"{seen['threads']} thread(s)")


def main(argv):
    if argv[:1] == ["--show"]:
        seen = probe(environ=env())
        print(describe(seen))
        return 0 if not in_force(seen) else 1
    if argv[:1] == ["--"] and len(argv) > 1:
        os.execvpe(argv[1], argv[1:], env())
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
