"""What pinning the CPU kernels costs: every chapter in the Colab simulation,
pinned (scripts/pinned_cpu.py, as `make test` runs it) and unpinned (one
thread only, as before the pins), side by side: the two runs of a chapter go
at the same time, one per core, so both see the same machine load.

    .venv/bin/python benchmarks/bench_pinning.py [chapters/NN_*.ipynb ...] [--save DIR]

Prints each chapter's seconds (environment, install and nbval) both ways and
the ratio. The unpinned run's outputs may differ from the stored ones (that
is what the pins are for); only its time is used.
"""
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import colab_sim  # noqa: E402


def main(argv):
    save = None
    if "--save" in argv:           # --save DIR: also save the run for the book's appendix
        at = argv.index("--save")
        save, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    chapters = [Path(a) for a in argv] or sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    table = []
    with tempfile.TemporaryDirectory(prefix="bench-pinning-") as work:
        sim = colab_sim.Simulation(work)
        print(f"{'chapter':34s} {'unpinned':>9s} {'pinned':>8s} {'ratio':>6s}  pinned outputs")
        totals = [0.0, 0.0]
        for nb in chapters:
            results = {}

            def one(pinned):
                results[pinned] = sim.run(nb, timeout=900, pinned=pinned)

            lanes = [threading.Thread(target=one, args=(p,)) for p in (False, True)]
            for lane in lanes:
                lane.start()
            for lane in lanes:
                lane.join()
            secs = [results[p]["setup_s"] + results[p]["nbval_s"] for p in (False, True)]
            totals = [t + s for t, s in zip(totals, secs)]
            ok = "match" if results[True]["returncode"] == 0 else "DIFFER"
            print(f"{nb.stem:34s} {secs[0]:8.1f}s {secs[1]:7.1f}s {secs[1] / secs[0]:6.2f}  {ok}", flush=True)
            table.append([nb.stem[:2], f"{secs[0]:.1f} s", f"{secs[1]:.1f} s", f"{secs[1] / secs[0]:.2f}", ok])
        print(f"{'all chapters':34s} {totals[0]:8.1f}s {totals[1]:7.1f}s {totals[1] / totals[0]:6.2f}")
    if save:
        import write_appendix
        table.append(["all", f"{totals[0]:.1f} s", f"{totals[1]:.1f} s", f"{totals[1] / totals[0]:.2f}", ""])
        write_appendix.save({
            "section": "pinning", "title": "every chapter pinned and unpinned, side by side",
            "command": "`make bench-pinning`", "source": "`benchmarks/bench_pinning.py --save`, this run's table",
            "text": ["Each chapter ran in the Colab simulation twice at once, one run per core: pinned as "
                     "`make test` runs it, and unpinned (one thread only, as before the pins)."],
            "tables": [{"columns": ["chapter", "unpinned", "pinned", "ratio", "pinned outputs"], "rows": table}]},
            save)


if __name__ == "__main__":
    main(sys.argv[1:])
