"""search -> train -> predict --labels on real speech: the FSDD set in the HW4 format (6 speakers, 2,400 labelled
and 600 test utterances, with test labels; ../shared/data/fsdd). Prints each command, its wall time and
CPU seconds, the test accuracy of the best trial's checkpoint, of the top-3 average and of the final fit,
and the checkpoint footprint (bytes per trial in the artifact store).

Run from the repository root:
  python -m bench.bench_fsdd [--fsdd ../shared/data/fsdd] [--n-trials 10] [--final-steps 1000] [--workers 1]
"""
import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, args: list[str], cwd: Path) -> str:
    cpu = _children_cpu()
    start = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "run_study.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall, cpu = time.time() - start, _children_cpu() - cpu
    if done.returncode != 0:
        sys.exit(f"{label} failed ({done.returncode}):\n{done.stderr}")
    print(f"{label:<14} {wall:7.1f} s wall {cpu:7.1f} CPU s   run-study {' '.join(args)}")
    return done.stdout


def accuracy(out: str) -> str:
    found = re.search(r"accuracy (\S+) on (\d+)", out)
    return f"{found.group(1)} on {found.group(2)} test utterances" if found else "?"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd")
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--final-steps", type=int, default=1000)
    parser.add_argument("--workers", default="1")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_fsdd-"))
    (work / "datasets").mkdir(parents=True, exist_ok=True)
    data = work / "datasets" / "fsdd"
    if not data.exists():
        shutil.copytree(args.fsdd / "hw4", data)  # the project writes its pack inside the data folder
    labels = str(args.fsdd / "test_labels_names.csv")
    study = ["--set", "study.name=fsdd"]
    print(f"FSDD at {args.fsdd}; working in {work}; {os.cpu_count()} CPUs")
    run("pack", ["pack", str(data)], work)
    run("search", ["search", str(ROOT / "studies" / "quickstart.toml"), "--data", str(data), *study,
                   "--n-trials", str(args.n_trials), "--workers", args.workers, "-q",
                   "--storage", f"sqlite:///{work / 'fsdd.db'}"], work)
    storage = ["--storage", f"sqlite:///{work / 'fsdd.db'}", "--data", str(data)]
    best = run("predict best", ["predict", "fsdd", *storage, "--out", "best.csv", "--labels", labels], work)
    top3 = run("predict top-3", ["predict", "fsdd", *storage, "--top-k", "3", "--out", "top3.csv",
                                 "--labels", labels], work)
    run("train", ["train", "fsdd", *storage, "--set", f"train.max_steps={args.final_steps}",
                  "--out", "final.pt"], work)
    final = run("predict final", ["predict", "final.pt", "--data", str(data), "--out", "final.csv",
                                  "--labels", labels], work)
    print(f"test accuracy: best trial {accuracy(best)}; top-3 average {accuracy(top3)}; "
          f"final fit ({args.final_steps} steps) {accuracy(final)}")
    files = [f for f in (work / "fsdd.artifacts").iterdir() if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    print(f"checkpoints: {len(files)} files, {total / 1e6:.2f} MB, {total / max(1, len(files)) / 1e3:.0f} kB per "
          f"trial (one best model each; latest states are removed when a trial ends); final fit "
          f"{(work / 'final.pt').stat().st_size / 1e3:.0f} kB")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
