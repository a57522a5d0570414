"""Start-up of the commands that never train, against optuna-dashboard alone, in one run.

On a small study (9 trials in SQLite, a study file beside it) it times, as a user sees them (wall clock of a
new process): `run-study --help`, `run-study report STUDY` (all default formats), the time until
`run-study dashboard STUDY` answers HTTP, and the time until `optuna-dashboard sqlite:///...` answers HTTP on
the same file. Each is run --repeats times; the median is printed with its difference from optuna-dashboard.
Goal: each within 1 s of optuna-dashboard.

Run from the repository root:  python -m bench.bench_startup [--repeats 3]
"""
import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

BIN = Path(sys.executable).parent


def _small_study(folder: Path) -> Path:
    url = f"sqlite:///{folder / 'small.db'}"
    study = optuna.create_study(study_name="small", storage=url, direction="maximize")
    dists = {"pooling": CategoricalDistribution(["mean", "stats", "attention"]),
             "lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(9):
        study.add_trial(create_trial(params={"pooling": ["mean", "stats", "attention"][i % 3], "lr": 1e-4 * 1.6**i},
                                     distributions=dists, value=0.3 + 0.05 * i,
                                     intermediate_values={100: 0.1 + 0.03 * i, 200: 0.3 + 0.05 * i}))
    study_file = folder / "small.toml"
    study_file.write_text('[model]\npooling = ["mean", "stats", "attention"]\n[train]\nlr = { low = 1e-4, '
                          'high = 1e-2, log = true }\n')
    return study_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_run(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _until_http(command: list[str], cwd: Path) -> float:
    """Seconds from starting `command --port P` until it answers HTTP on P."""
    port = _free_port()
    command = [*command, "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 120:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/meta",
                                                 headers={"Accept-Encoding": "gzip"})
                with urllib.request.urlopen(request, timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{command[0]} did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study_file = _small_study(folder)
        run_study = str(BIN / "run-study")
        cases = {
            "optuna-dashboard answers HTTP": lambda: _until_http(
                [str(BIN / "optuna-dashboard"), f"sqlite:///{folder / 'small.db'}"], folder),
            "run-study dashboard answers HTTP": lambda: _until_http([run_study, "dashboard", str(study_file)], folder),
            "run-study --help": lambda: _timed_run([run_study, "--help"], folder),
            "run-study report (md, csv, html)": lambda: _timed_run([run_study, "report", str(study_file)], folder),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so machine load affects every case alike
            for name, case in cases.items():
                times[name].append(case())
    reference = statistics.median(times["optuna-dashboard answers HTTP"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<36} {median:6.2f} s (median of {len(values)})   {median - reference:+6.2f} s vs "
              "optuna-dashboard")


if __name__ == "__main__":
    main()
