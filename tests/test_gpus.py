"""GPU placement on a machine without one: which GPU each worker gets, the one-line refusals, what a trial
records and `status` shows. (The GPUs themselves are exercised by bench/gpu_smoke.sh on a lent GPU.)"""
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

import run_study
from search import workers
from search.probe import ProbePoint, choose_per_gpu, describe, measure_on
from search.provenance import physical_gpu
from search.status import study_status
from search.workers import Workers, parse_gpus, parse_per_gpu, parse_workers, placements
from tests.conftest import write_study
from tests.test_cli import FAST

ROOT = Path(__file__).resolve().parent.parent


def test_workers_are_spread_over_the_gpus_k_per_gpu_with_the_cores_split_as_without(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: list(range(8)))
    assert parse_gpus("auto", count=2) == (0, 1) and parse_gpus(None, count=0) == () and parse_gpus("none") == ()
    assert parse_gpus("1,3", count=4) == (1, 3)
    assert parse_workers("auto", gpu_slots=2 * parse_per_gpu("3")) == 6 and parse_workers("auto") == 8
    placed = placements(4, gpus=(1, 3))
    assert [p.gpu for p in placed] == [1, 3, 1, 3]  # 2 per GPU
    assert [p.cpus for p in placed] == [(0, 1), (2, 3), (4, 5), (6, 7)] and {p.threads for p in placed} == {2}
    assert [p.gpu for p in placements(2)] == [None, None]


@pytest.mark.parametrize(("text", "count", "message"), [
    ("0", 0, "--gpus 0: this machine has no CUDA GPU (torch sees none); use --gpus none"),
    ("2", 2, "--gpus 2: there is no GPU 2 here; GPUs: 0, 1"),
    ("0,0", 2, "--gpus '0,0': give 'auto', 'none' or distinct GPU indices"),
    ("gpu0", 2, "--gpus 'gpu0': give 'auto', 'none' or distinct GPU indices"),
])
def test_gpus_that_are_not_there_are_refused(text, count, message):
    with pytest.raises(ValueError) as err:
        parse_gpus(text, count=count)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError, match="--per-gpu '0' must be a positive integer"):
        parse_per_gpu("0")


def test_each_worker_sees_only_its_gpu_and_none_means_the_cpu(monkeypatch):
    started = []

    class Proc:
        pid, stdout = 1, iter(())

        def __init__(self, cmd, env, **_):
            started.append((cmd, env))

    monkeypatch.setattr(subprocess, "Popen", Proc)
    monkeypatch.setattr(workers, "usable_cores", lambda: [0, 1])
    argv = ["search", "s.toml", "--gpus", "0,1", "--per-gpu=2", "--workers", "4"]
    shown = Workers(argv, 4, None, gpus=(0, 1))
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1", "0", "1"]
    assert all("--gpus" not in cmd and "--per-gpu=2" not in cmd and "--workers" not in cmd for cmd, _ in started)
    assert "w1: 1 thread(s), GPU 1" in shown.describe()
    started.clear()
    Workers(argv, 2, None, gpus=())  # --gpus none: no worker touches a GPU
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["", ""]
    started.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    Workers(argv, 2, None)  # no GPUs given: CUDA left as the parent has it
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["5", "5"]


def test_gpus_on_a_machine_without_one_is_one_line_and_stores_nothing(tmp_path, tiny_synthetic, capsys):
    study = write_study(tmp_path / "g.toml", FAST)
    for args, message in ((["--gpus", "0"], "this machine has no CUDA GPU"),
                          (["--per-gpu", "x"], "--per-gpu 'x' must be a positive integer"),
                          (["--set", "study.gpus=[-1]"], "study.gpus=[-1] must be")):
        code = run_study.main(["search", str(study), "--data", str(tiny_synthetic), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "g.db").exists()


def test_a_trial_records_its_gpu_and_status_shows_it():
    assert physical_gpu("2,3", 1) == 3 and physical_gpu(None, 0) == 0 and physical_gpu("GPU-ab12", 0) == "GPU-ab12"
    study = optuna.create_study(study_name="g", direction="maximize")
    study.add_trial(create_trial(state=TrialState.RUNNING, user_attrs={
        "worker": "host:11", "gpu": {"index": 3, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1}}))
    assert "running #0 on host:11 GPU 3 (NVIDIA H100 80GB HBM3): no step reported" in study_status(study, 0.0)


def test_out_of_gpu_memory_is_one_line_that_says_what_to_lower():
    import torch

    from search.faults import own_reason

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "79.1 GiB of which 1.2 GiB is free.\nOf the allocated memory 70 GiB ...")
    assert own_reason(oom) == ("out of GPU memory (CUDA out of memory): a smaller model or train.batch_size, or "
                               "fewer workers per GPU (--per-gpu)")
    assert own_reason(ValueError("bad\nsecond line")) == "bad" and own_reason(RuntimeError()) == "RuntimeError"


def _recorded(rates: dict[int, float], peak: float = 2.0, free: float | None = 70.0):
    """measure(K) from recorded numbers (steps/s of K processes together on one GPU)."""
    asked = []

    def measure(k: int) -> ProbePoint:
        asked.append(k)
        return ProbePoint(k, rates[k], peak, free)

    return measure, asked


@pytest.mark.parametrize(("rates", "peak", "free", "chosen", "asked", "why"), [
    # small model, GPU mostly idle: doubling pays until 8; 16 gives only 1.05x
    ({1: 120, 2: 230, 4: 430, 8: 700, 16: 735}, 2.0, 70.0, 8, [1, 2, 4, 8, 16], "K=16 gave 1.05x"),
    # a big model already fills the GPU: 2 processes give 1.08x, keep 1
    ({1: 60, 2: 65}, 9.0, 70.0, 1, [1, 2], "K=2 gave 1.08x"),
    # memory stops it before speed does: 8 x 6 GiB x 1.5 headroom > 70 GiB free
    ({1: 100, 2: 190, 4: 360}, 6.0, 70.0, 4, [1, 2, 4], "K=8 would need about 72.0 GiB, 70.0 GiB were free"),
    # on a CPU (no memory figures), capped at MAX_K
    ({k: 100.0 * k for k in (1, 2, 4, 8, 16)}, 0.0, None, 16, [1, 2, 4, 8, 16], "K=16 is the most probed"),
])
def test_per_gpu_auto_doubles_while_steps_per_s_rise_15_percent_and_memory_fits(rates, peak, free, chosen, asked,
                                                                                why):
    measure, measured = _recorded(rates, peak, free)
    k, points, reason = choose_per_gpu(measure)
    assert (k, measured) == (chosen, asked) and reason.startswith(why), reason
    assert [p.k for p in points] == asked and describe(k, points, reason).startswith(
        f"--per-gpu auto: {chosen} worker(s) per GPU (K=1: {rates[1]:.0f} steps/s")


def test_a_probe_measures_k_processes_at_once_with_the_studys_first_configuration(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "p.toml", FAST)
    point = measure_on(None, [str(study), "--data", str(tiny_synthetic)], seconds=1.0)(2)
    assert point.k == 2 and point.steps_per_s > 0 and point.peak_gib == 0.0 and point.free_gib is None  # CPU here
    with pytest.raises(RuntimeError, match="a probe process failed: .*no_such_key"):
        measure_on(None, [str(study), "--data", str(tiny_synthetic), "--set", "train.no_such_key=1"])(2)


def test_a_probe_process_counts_steps_only_once_all_k_have_started(tmp_path, tiny_synthetic):
    """The barrier: a probe process of K=2 waits for the second one (here: this test, 2 s late) before its
    counted window starts, so K processes' speeds are those of K trainings that overlap."""
    study, barrier = write_study(tmp_path / "p.toml", FAST), tmp_path / "barrier"
    barrier.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "search.probe", str(study), "--data", str(tiny_synthetic),
                             "--seconds", "0.5", "--barrier", str(barrier), "--k", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not list(barrier.glob("ready-*")):  # it has started up and waits
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    time.sleep(2.0)
    released = time.time()
    (barrier / "ready-test").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["window_start"] >= released + 0.9 and result["steps_per_s"] > 0  # released, then 1 s warm-up


def test_per_gpu_auto_without_a_gpu_is_one_line(tmp_path, tiny_synthetic, capsys):
    study = write_study(tmp_path / "a.toml", FAST)
    assert run_study.main(["search", str(study), "--data", str(tiny_synthetic), "--per-gpu", "auto"]) == 2
    assert "--per-gpu auto: there is no GPU to probe" in capsys.readouterr().err
    assert not (tmp_path / "a.db").exists()


def test_the_gpu_packing_bench_reads_utilisation_and_memory_inside_the_counted_window_only():
    from bench.bench_gpu_packing import GpuMonitor

    monitor = GpuMonitor(None)
    monitor.out = ("2026/12/02 10:00:00.000, 5, 1024\n"  # start-up: not counted
                   "2026/12/02 10:00:01.000, 80, 4096\n2026/12/02 10:00:01.200, 90, 6144\n"
                   "[N/A], [N/A], [N/A]\n2026/12/02 10:00:03.000, 0, 512\n")
    start = datetime(2026, 12, 2, 10, 0, 0, 500000).timestamp()
    assert monitor.within(start, start + 1.0) == (85.0, 6.0)
    assert monitor.within(start + 5, start + 6) == (None, None)
