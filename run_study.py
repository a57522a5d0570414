"""run-study: search, ablate and report on speaker-classification models (ML2023Spring HW4 format).

Exit codes: 0 the asked work is done (or its --timeout reached); 1 every trial this run started failed on its
own; 2 bad input (one line `error: ...` on stderr, nothing stored); 3 stopped before the work was done
(max_failures_in_row failures in a row, ablation cells that failed, workers that crashed); 4 the storage was
unreachable past study.storage_outage_s, or is damaged; 5 disk full; 130 / 143 stopped by SIGINT / SIGTERM
(running trials marked interrupted, retried from their checkpoints).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

PREDICT_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # search.precision.PRECISIONS; not imported: it loads torch

EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_STORAGE, EXIT_DISK_FULL = 1, 2, 3, 4, 5  # as search/faults.py
EXIT_TERMINATED = 143
ENV_SET = "RUN_STUDY_SET"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse prints usage too)
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (none where there is none: no "(default: None)") and the Example
    epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or "default" in (
                action.help or ""):  # the help says it already, or there is nothing to say
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    if hasattr(args, "overrides"):
        args.overrides += env_overrides(args.command)
    args.done = False  # set once the asked work is done: a signal during the summary then changes nothing
    try:
        return args.func(args) or 0
    except _bad_input() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except _storage_lost() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STORAGE
    except OSError as err:  # a report, a pack or a checkpoint that cannot be written: the real cause, one line
        faults = sys.modules.get("search.faults")
        full = faults is not None and faults.is_disk_full(err)
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"error: {where}{err.strerror or err}" + ("; free space and run again" if full else ""), file=sys.stderr)
        return EXIT_DISK_FULL if full else EXIT_FAILED
    except KeyboardInterrupt as interrupt:
        runner = sys.modules.get("search.runner")  # it installs the SIGTERM handler; without it only Ctrl-C lands here
        code = runner.exit_code(interrupt) if runner else 128 + signal.SIGINT
        name = "SIGTERM" if code == EXIT_TERMINATED else "SIGINT"
        if args.done:
            print(f"interrupted ({name}) after the work was done; everything is stored", file=sys.stderr)
            return 0
        if args.command not in ("search", "ablate", "explain"):
            print(f"interrupted ({name})", file=sys.stderr)
        elif getattr(args, "worker_id", None) is None:  # workers stay quiet: their parent says it once
            print(f"interrupted ({name}): running trials are marked failed (reason 'interrupted') and rerun by "
                  "the next run; finished trials are stored. Run the same command again to resume", file=sys.stderr)
        return code


def env_overrides(command: str) -> list[str]:
    """$RUN_STUDY_SET: extra `--set` items for every command that takes them, applied after the command line's
    (so they win), e.g. RUN_STUDY_SET="train.max_steps=20 train.valid_steps=10" to try any command quickly.
    Shell-quoted, like a command line. A final fit (`train`) takes only its model.*, train.* and data.* items."""
    import os
    import shlex

    items = shlex.split(os.environ.get(ENV_SET, ""))
    if command in ("train", "explain"):  # explain: train.* for its runs, study.*/data.* to find the search
        keep = ("model", "train", "data") if command == "train" else ("study", "train", "data")
        items = [item for item in items if item.partition(".")[0].strip() in keep]
    return items


def _storage_lost() -> tuple[type[Exception], ...]:
    """StorageLost, when this command imported the storage code (it cannot have been raised otherwise)."""
    faults = sys.modules.get("search.faults")
    return (faults.StorageLost,) if faults is not None else ()


def _bad_input() -> tuple[type[Exception], ...]:
    """The errors that are bad input (one line, exit 2): SpecError, and DataError / ConfigError when this command
    loaded their packages. Those import torch, which report, dashboard and status never load: a module that was
    never imported cannot have raised."""
    from search.studyfile import SpecError

    loaded = (("data.errors", "DataError"), ("models.registry", "ConfigError"))
    return (SpecError, *(getattr(sys.modules[module], name) for module, name in loaded if module in sys.modules))


def _parser() -> argparse.ArgumentParser:
    from functools import partial
    from importlib.metadata import PackageNotFoundError, version

    def example(*lines: str) -> str:  # every --help ends with a command line to copy
        return "Example:\n" + "\n".join(f"  {line}" for line in lines)

    try:
        release = version("hw4-search")
    except PackageNotFoundError:  # a checkout run without `pip install -e .`
        release = "unknown (not installed)"
    parser = _Parser(prog="run-study", description=__doc__.splitlines()[0], formatter_class=_Help,
                     epilog=example("run-study search studies/quickstart.toml --n-trials 20 --workers auto",
                                    "run-study status studies/quickstart.toml"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {release}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=partial(_Parser, formatter_class=_Help))

    p = sub.add_parser("make-data", help="write a synthetic dataset in the HW4 format",
                       epilog=example("run-study make-data datasets/toy --speakers 10 --utterances-per-speaker 20"))
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument("--speakers", type=int, default=40, help="number of speakers")
    p.add_argument("--utterances-per-speaker", type=int, default=60, help="utterances of each speaker")
    p.add_argument("--n-mels", type=int, default=40, help="mel bins per frame")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("pack", help="validate a HW4 folder and build its packed memory-mapped store",
                       epilog=example("run-study pack path/to/Dataset"))
    p.add_argument("data", type=Path, help="HW4 folder (metadata.json, mapping.json, uttr-*.pt)")
    p.add_argument("--cache-dir", type=Path, help="where to put the pack (default: DATA/.hw4pack)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("search", help="create or resume a study and run trials",
                       epilog=example("run-study search studies/quickstart.toml --n-trials 20 --workers auto"))
    _add_run_options(p, "study file, e.g. studies/quickstart.toml", "model.d_model=[64,128]")
    p.add_argument("--n-trials", type=int, help="finished (complete or pruned) trials the study should hold; failed "
                                                "ones do not count (overrides study.n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ablate", help="run or resume an ablation: fixed variants x seeds, then its table",
                       epilog=example("run-study ablate studies/boss_ablation.toml --workers 2"))
    _add_run_options(p, "ablation study file, e.g. studies/boss_ablation.toml", "ablation.seeds=[0,1,2]")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("explain", help="why a search's best trial wins: it again with each choice put back to a "
                                       "reference (or a greedy path to it), over seeds, paired, in one table",
                       epilog=example("run-study explain studies/quickstart.toml --seeds 5 --dry-run",
                                      "run-study explain studies/quickstart.toml --seeds 5 --workers auto"))
    _add_run_options(p, "the search's study file, e.g. studies/quickstart.toml", "train.max_steps=2000")
    p.add_argument("--trial", default="best", metavar="best|N", help="the trial to explain (default: the best)")
    p.add_argument("--reference", default="sample", metavar="sample|FILE.toml",
                   help="what each choice is put back to: the official sample config's values (default) or a "
                        "study file's; keys it does not set take the search space's first choice")
    p.add_argument("--seeds", type=int, default=5, help="seeds per variant, paired (default 5; 6+ for a Wilcoxon "
                                                        "p that can go below 0.05)")
    p.add_argument("--name", help="the explain study's name (default: SEARCH-explain-tN, SEARCH-explain-tN-path "
                                   "with --path); another name keeps an earlier explain of the same trial")
    p.add_argument("--path", action="store_true",
                   help="a greedy path from the reference to the winner instead: each step adds the change that "
                        "helps most (mean over the seeds), compared with the step before, paired by seed")
    next(a for a in p._actions if a.dest == "dry_run").help = ("list the variants and their cost, train nothing "
                                                                "(with --slurm: print the batch script)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="print a study's top trials (or ablation table), or several studies side by "
                                      "side, and write Markdown, CSV, LaTeX, offline HTML with figures",
                       epilog=example("run-study report studies/quickstart.toml --top 5 --format md,html"))
    p.add_argument("studies", nargs="+", metavar="STUDY", help="study file or study name; several: side by side")
    _add_storage_option(p)
    p.add_argument("--out", type=Path, help="output folder (default: the storage's own, e.g. studies/NAME.results "
                                            "beside studies/NAME.db; A-vs-B.* there for several)")
    p.add_argument("--top", type=int, default=10, help="how many trials to list")
    p.add_argument("--format", default="md,csv,html",
                   help="comma-separated: md, csv, tex (LaTeX, booktabs), html (offline, with figures)")
    p.add_argument("--figures", default="", metavar="pdf,svg,png",
                   help="also write each figure as OUT/NAME-FIGURE.FORMAT for a paper (one column wide; plotly's "
                        "static export through kaleido and Chromium)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="open the study storage in optuna-dashboard",
                       epilog=example("run-study dashboard studies/quickstart.toml --port 8080"))
    p.add_argument("study", help="study file or study name")
    _add_storage_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("status", help="where a study stands: trials per state, running trials (worker, last step, "
                                      "heartbeat), the best trial, mean trial time and ETA",
                       epilog=example("run-study status studies/quickstart.toml"))
    p.add_argument("study", help="study file or study name")
    _add_storage_option(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("train", help="final fit: train one trial's config again (e.g. longer) through the same "
                                     "training function, and save it as one checkpoint file",
                       epilog=example("run-study train studies/quickstart.toml --trial best --set train.max_steps=5000 "
                                      "--set data.valid_fraction=0.05"))
    p.add_argument("study", help="study file or study name")
    _add_storage_option(p)
    p.add_argument("--trial", default="best", help="'best' or a trial number")
    p.add_argument("--data", type=Path, help="HW4 folder (default: the study file's data.path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the trial's config, e.g. train.max_steps=5000 or data.valid_fraction=0.05")
    p.add_argument("--out", type=Path, help="checkpoint file (default: STUDY-trial-N-final.pt in the storage's "
                                            "results folder, e.g. studies/NAME.results/)")
    p.add_argument("--gpus", metavar="auto|none|I", help="the GPU of the fit: 'auto' (the first; the default), "
                                                          "'none' (CPU) or one index")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict the test set (testdata.json) and write a Kaggle HW4 submission "
                                       "(Id,Category); with --labels, print the accuracy",
                       epilog=example("run-study predict studies/quickstart.toml --top-k 3 --data datasets/quickstart "
                                      "--out submission.csv"))
    p.add_argument("source", metavar="CHECKPOINT|STUDY", help="a checkpoint file (.pt), a study file or study name")
    _add_storage_option(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", help="a study's trial: 'best' (the default) or a trial number")
    which.add_argument("--top-k", type=int, metavar="K", help="average the softmax of the K best trials' checkpoints")
    p.add_argument("--data", type=Path, help="HW4 folder with testdata.json (default: the study file's data.path)")
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV to write")
    p.add_argument("--labels", type=Path, help="a CSV in the submission format with the true speakers: print accuracy")
    p.add_argument("--batch-size", type=int, default=64, help="test utterances per batch (whole utterances)")
    p.add_argument("--other-data", action="store_true",
                   help="allow a dataset other than the training one (same speakers and n_mels)")
    p.add_argument("--precision", choices=PREDICT_PRECISIONS,
                   help="compute in this precision instead of the one each checkpoint was trained with")
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default: measured once per machine: all "
                                               "cores only where they pay for their CPU-seconds, else one)")
    p.set_defaults(func=cmd_predict)
    return parser


def _add_run_options(p: argparse.ArgumentParser, study_help: str, example: str) -> None:
    """The options shared by the commands that train: search and ablate."""
    p.add_argument("study", type=Path, help=study_help)
    p.add_argument("--data", type=Path, help="HW4 folder (overrides data.path)")
    _add_storage_option(p)
    p.add_argument("--out", type=Path, help="folder for the end-of-run report (default: the storage's own, e.g. "
                                            "studies/NAME.results beside studies/NAME.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a study-file value, e.g. train.max_steps=200 or {example}")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress; only failures and the summary")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="Optuna's own log lines too, and the whole report at the end")
    p.add_argument("--workers", metavar="N",
                   help="local worker processes on this study ('auto' = one per usable core; default: "
                        "study.workers, else 1); each "
                        "gets cores // N torch threads and its own cores. More machines: run the same command "
                        "there with the same --storage")
    p.add_argument("--gpus", metavar="auto|none|0,1",
                   help="GPUs to place the workers on: 'auto' (every GPU; the default), 'none' (CPU only) or "
                        "indices; worker i gets one GPU (CUDA_VISIBLE_DEVICES). Default: study.gpus, else auto")
    p.add_argument("--per-gpu", metavar="K", help="workers sharing each GPU (default: study.per_gpu, else 1); "
                                                   "--workers auto = GPUs x K")
    for hidden in ("--worker-id", "--threads", "--parent"):  # set by the parent for its workers
        p.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpus", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    from search import slurm

    slurm.add_options(p)


def _add_storage_option(p: argparse.ArgumentParser) -> None:
    """--storage of every command that opens a study; OPTUNA_STORAGE is its default, as in Optuna's own CLI."""
    import os

    p.add_argument("--storage", metavar="URL", default=os.environ.get("OPTUNA_STORAGE") or None,
                   help="sqlite:///FILE.db, postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB; if not "
                        "given: $OPTUNA_STORAGE, then the study file's [study] storage, then NAME.db beside the "
                        "study file (studies/NAME.db for a study name). A relative file is relative to the current "
                        "folder here, to the study file's folder in the study file")


def cmd_make_data(args: argparse.Namespace) -> None:
    from data.synthetic import make_synthetic

    out = make_synthetic(args.out, args.speakers, args.utterances_per_speaker, args.seed, n_mels=args.n_mels)
    print(f"wrote synthetic HW4 dataset to {out}")


def cmd_pack(args: argparse.Namespace) -> None:
    from data import open_store

    store = open_store(args.data, args.cache_dir)
    print(f"packed {store.n_train} labelled + {store.n_test} test utterances, {store.n_classes} speakers, "
          f"{store.n_mels} mels, fingerprint {store.fingerprint}")


def cmd_search(args: argparse.Namespace) -> int:
    from search.spec import load_spec
    from search.study import run_study
    from search.studyfile import SpecError

    spec = load_spec(args.study, args.overrides)
    if spec.is_ablation:
        raise SpecError(f"{spec.path}: this is an ablation study file; run it with: run-study ablate {spec.path}")
    _check_positive("--n-trials", args.n_trials)
    _check_positive("--timeout", args.timeout)
    n_trials = args.n_trials or spec.n_trials
    if n_trials is None and not (args.timeout or spec.timeout):
        n_trials = 10
    if args.slurm is not None:
        return _submit(args, spec)

    def setup(study) -> None:
        from search.runner import retry_interrupted
        from search.status import TARGET_ATTR

        if n_trials and study.user_attrs.get(TARGET_ATTR) != n_trials:
            study.set_user_attr(TARGET_ATTR, n_trials)  # for `run-study status`'s ETA
        queued = retry_interrupted(study)
        if queued:
            print(f"{queued} interrupted trial(s) queued again with the same parameters")

    return _run(args, spec, args.timeout or spec.timeout, setup,
                lambda study, store, deadline, artifacts: run_study(study, spec, store, n_trials, deadline,
                                                                     artifact_store=artifacts), top=5,
                target=lambda: n_trials)


def cmd_ablate(args: argparse.Namespace) -> int:
    from search.ablation import enqueue_missing_cells, load_ablation, open_ablation, run_ablation

    ablation = load_ablation(args.study, args.overrides)
    if args.slurm is not None:
        return _submit(args, ablation.study)
    rows: dict = {}

    def open_study(url: str, fingerprint: str, wait: bool):
        study, opened = open_ablation(ablation, url, fingerprint, wait)
        rows.update(opened)
        return study

    def setup(study) -> None:
        queued = enqueue_missing_cells(study, ablation.seeds, rows)
        print(f"{queued} cell(s) queued of {len(rows) * len(ablation.seeds)}")

    return _run(args, ablation.study, None, setup,
                lambda study, store, deadline, artifacts: run_ablation(
                    study, ablation.study, ablation.seeds, rows, store, deadline, artifact_store=artifacts), top=0,
                target=lambda: len(rows) * len(ablation.seeds),
                open_study=open_study)


def cmd_explain(args: argparse.Namespace) -> int:
    from search import explain as ex
    from search.ablation import enqueue_missing_cells, open_cells, run_ablation
    from search.cells import EXPLAIN_ATTR
    from search.spec import load_spec
    from search.storage import load_existing_study
    from search.studyfile import SpecError

    _check_positive("--seeds", args.seeds)
    runs = [item for item in args.overrides if item.partition(".")[0].strip() == "train"]
    other = [item for item in args.overrides if item not in runs]
    bad = [item for item in other if item.partition(".")[0].strip() not in ("study", "data")]
    if bad:
        raise SpecError(f"--set {bad[0]}: explain takes train.KEY=VALUE (applied to every variant it runs) and "
                        "study.KEY / data.KEY (to find the search); the model keys are the winner's")
    spec = load_spec(args.study, other)
    url = args.storage or spec.storage_url
    source = load_existing_study(spec.name, url)
    trial = ex.chosen_trial(source, args.trial, spec.path)
    if args.trial == "best" and args.worker_id is None:
        args.argv = [*args.argv, "--trial", str(trial.number)]  # workers explain this trial, whatever ends best
    explanation = ex.explain(spec, trial, args.reference, args.seeds, _train_values(spec, runs), args.path)
    if not explanation.factors:
        raise SpecError(f"trial {trial.number} of {spec.name!r} takes the reference's value for every searched key; "
                        "there is nothing to explain (try --reference FILE.toml)")
    rows, seeds = explanation.rows(), explanation.seeds
    name = args.name or ex.study_name(spec.name, trial.number, args.path)
    if args.dry_run and args.slurm is None:
        print(ex.describe(explanation, trial, name, args.workers, source.get_trials(deepcopy=False)))
        return 0
    explain_spec = dataclasses.replace(spec, name=name, storage=url)  # the search's storage, beside it
    if args.slurm is not None:
        return _submit(args, explain_spec)

    def open_study(url: str, fingerprint: str, wait: bool):
        if source.user_attrs.get("data_fingerprint") not in (None, fingerprint):
            raise SpecError(f"study {spec.name!r} was searched on other data (fingerprint "
                            f"{source.user_attrs['data_fingerprint']}, now {fingerprint}); explain it on its own data")
        attrs = {EXPLAIN_ATTR: explanation.attr(), **({} if args.path else {"rows": list(rows)})}  # path: as it runs
        return open_cells(explain_spec, ex.REFERENCE if args.path else ex.WINNER, seeds, explanation.identity(), url,
                          fingerprint, wait, attrs, rename="--name NEW")

    def setup(study) -> None:
        print(ex.describe(explanation, trial, name, args.workers, source.get_trials(deepcopy=False), short=True))
        if not args.path:  # the path queues each step's cells as it goes
            print(f"{enqueue_missing_cells(study, seeds, rows)} cell(s) queued of {len(rows) * len(seeds)}")

    def run(study, store, deadline, artifacts):
        if args.path:
            return ex.run_path(study, explanation, explain_spec, store, deadline, artifacts)
        return run_ablation(study, explain_spec, seeds, rows, store, deadline, artifact_store=artifacts)

    return _run(args, explain_spec, None, setup, run, top=0, target=lambda: ex.n_cells(explanation),
                open_study=open_study)


def _train_values(spec, items: list[str]) -> dict:
    """explain's --set train.KEY=VALUE items as {KEY: value}, parsed as the study file's own values are."""
    from search.ablation import TRAIN_KEYS
    from search.studyfile import SpecError, load_raw

    _, raw = load_raw(spec.path, items)
    values = {}
    for item in items:
        key = item.partition("=")[0].strip().partition(".")[2]
        if key not in TRAIN_KEYS:
            raise SpecError(f"--set {item}: unknown key train.{key}; valid: {', '.join(sorted(TRAIN_KEYS))}")
        if isinstance(raw["train"].get(key), (list, dict)):
            raise SpecError(f"--set {item}: explain runs fixed configurations; give one value")
        values[key] = raw["train"][key]
    return values


def _submit(args, spec) -> int:
    """--slurm N: this command as a Slurm job array (search/slurm.py); nothing is trained here."""
    from search import slurm
    from search.storage import results_dir

    url = args.storage or spec.storage_url
    return slurm.submit(args, args.argv, spec.name, url, results_dir(url, spec.path.parent) / "slurm")


def _run(args, spec, timeout, setup, run, top: int, target, open_study=None) -> int:
    """What search and ablate share: data, storage, study; then this process or N workers run trials."""
    import time

    from search import progress
    from search.artifact_store import default_location
    from search.checkpoints import open_checkpoints
    from search.origin import record_command, record_dataset
    from search.runner import RunStats, gate, handle_signals, watch_parent
    from search.strategies import make_pruner, make_sampler
    from search.study import create_or_resume
    from search.studyfile import SpecError
    from search.workers import Workers, apply_placement, guard_output, parse_gpus, parse_per_gpu, parse_workers

    handle_signals()  # only where trials run: SIGINT/SIGTERM must mark them failed, not leave them RUNNING
    guard_output()  # a closed pipe (`| head`, a parent gone) ends what is shown, not the work
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)  # we say it
    is_worker = args.worker_id is not None
    gpus_asked = args.gpus or spec.gpus
    per_gpu_asked = args.per_gpu or spec.per_gpu
    try:
        gpus = None if is_worker else parse_gpus(gpus_asked)  # a worker sees only its own (its parent chose)
        per_gpu = parse_per_gpu(per_gpu_asked, gpus if gpus is not None else (0,))
        # GPUs asked for by name mean "use them": one worker per GPU slot unless --workers says otherwise
        workers = args.workers or spec.workers or ("auto" if gpus and (gpus_asked or per_gpu_asked) else "1")
        n_workers = parse_workers(workers, len(gpus or ()) * (1 if per_gpu == "auto" else per_gpu))
    except ValueError as err:
        raise SpecError(str(err)) from None
    make_sampler(spec), make_pruner(spec)  # bad arguments: one line now, before any data or storage work
    if is_worker and args.parent is not None:
        watch_parent(args.parent)
    store = _open_data(spec, args.data, quiet=is_worker)
    url = args.storage or spec.storage_url
    study = (open_study or (lambda u, fp, w: create_or_resume(spec, u, fp, wait=w)))(url, store.fingerprint, is_worker)
    artifact_store = open_checkpoints(study, spec, url)
    deadline = args.deadline or (time.time() + timeout if timeout else None)
    failure_log = Path(default_location(url, spec.path)).with_suffix(".log")
    if is_worker:  # a worker started by the command below: run, say nothing more
        apply_placement(args.threads, args.cpus)
        progress.activate(progress.Progress(progress.QUIET if args.quiet else progress.LINES,
                                            failure_log=failure_log, stream=sys.stdout))  # the parent prefixes it
        stats = run(study, store, deadline, artifact_store)
        _say_stop(stats, sys.stdout)
        return _exit_code(stats)

    with gate(study):
        record_dataset(study, store, args.data or spec.data_path)
        record_command(study, spec.path, args.data, args.overrides, timeout)
        setup(study)
    done, wanted, _ = _done_of(study, target)
    if per_gpu == "auto" and not (wanted and done >= wanted):
        n_workers = _probe_per_gpu(args, spec, study, gpus, n_workers if workers != "auto" else None)
    if n_workers > 1 and wanted and done >= wanted:  # nothing to do: no worker processes to start and import torch
        n_workers = 1
    if n_workers == 1:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.state.name != "FAIL"]
        complete = [t.value for t in finished if t.value is not None and t.state.name == "COMPLETE"]
        progress.activate(progress.Progress(progress.choose_mode(args.quiet), target(), len(finished),
                                            max(complete, default=None), failure_log))
    if n_workers > 1:
        workers = Workers(args.argv, n_workers, deadline, gpus)
        print(f"{n_workers} workers on study {spec.name!r} ({workers.describe()})")
        codes = workers.wait()
        stats = RunStats.of(study, workers.names)
        if EXIT_USAGE in codes:
            return EXIT_USAGE
        code = _workers_code(codes, stats)
    else:
        apply_placement(None, None, gpus[0] if gpus else None, cpu_only=gpus == ())
        try:
            stats = run(study, store, deadline, artifact_store)
        finally:
            progress.active().close()
            progress.activate(None)
        _say_stop(stats, sys.stderr)
        code = _exit_code(stats)
    if code in (EXIT_STORAGE, EXIT_DISK_FULL):  # no report: it needs the storage or the disk that is gone
        return code
    unfinished = _unfinished(study, target, deadline)
    if unfinished and code == 0:
        print(unfinished, file=sys.stderr)
        code = EXIT_STOPPED
    args.done = code == 0
    _say_done(args, spec, study, stats, url, top)
    return code


def _probe_per_gpu(args, spec, study, gpus, n_workers: int | None) -> int:
    """--per-gpu auto: measure K on the first GPU, say it, store it; the workers to start (GPUs x K, unless
    --workers gave a number)."""
    from search import probe

    study_args = [str(spec.path), "--data", str(args.data or spec.data_path)]
    for item in args.overrides:
        study_args += ["--set", item]
    print(f"--per-gpu auto: probing K = 1, 2, 4, ... workers on GPU {gpus[0]} "
          f"({probe.WARMUP_S + probe.WINDOW_S:.0f} s each, after the processes' start-up)")
    k, points, why = probe.choose_per_gpu(probe.measure_on(gpus[0], study_args, n_gpus=len(gpus)))
    print(probe.describe(k, points, why))
    probe.record(study, k, points, why)
    return n_workers or len(gpus) * k


def _exit_code(stats) -> int:
    """A run's exit code: why its loop stopped (search/faults.py), else 1 when every trial it ran failed."""
    if stats.exit_code:
        return stats.exit_code
    return EXIT_FAILED if stats.all_failed else 0


def _workers_code(codes: list[int], stats) -> int:
    """The parent's code from its workers': a storage or disk fault first, then a stop, a signal, all failed.
    A worker that crashed or was killed says nothing here: if the work is not done, _unfinished says so."""
    for wanted in (EXIT_STORAGE, EXIT_DISK_FULL, EXIT_STOPPED):
        if wanted in codes:
            return wanted
    interrupted = [c for c in codes if c >= 128]
    if interrupted:
        return interrupted[0]
    return EXIT_FAILED if stats.all_failed else 0


def _unfinished(study, target, deadline) -> str:
    """Why the asked work is not done when the run ended without an error ('' when it is done): fewer
    finished trials or complete ablation cells than asked, and no deadline that explains it."""
    import time

    if deadline is not None and time.time() >= deadline:
        return ""
    done, wanted, what = _done_of(study, target)
    if not wanted or done >= wanted:
        return ""
    return (f"stopped before the work was done: {done} of {wanted} {what}; run the same command again to "
            "continue (failed trials are retried)")


def _done_of(study, target) -> tuple[int, int | None, str]:
    """(finished trials or complete ablation cells, how many are asked (None: no count, a deadline), what)."""
    wanted = target()
    trials = study.get_trials(deepcopy=False)
    if study.user_attrs.get("kind") == "ablation":
        from search.cells import cell_of

        return len({cell_of(t) for t in trials if t.state.name == "COMPLETE"}), wanted, "ablation cells are complete"
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials), wanted, "trials are finished"


def _say_done(args, spec, study, stats, url: str, top: int) -> None:
    """The end of a run: counts, the best trial, where the report and checkpoint are, what to run next.
    (An ablation prints its table: that is its result.) -v prints the whole report."""
    from reports import DEFAULT_FORMATS, write_report
    from reports.tables import budget_starved
    from search.attrs import best_of
    from search.checkpoints import best_checkpoint_id
    from search.origin import study_handle
    from search.progress import params_text
    from search.storage import results_dir

    text, paths = write_report(study, args.out or results_dir(url, spec.path.parent), top or 10, DEFAULT_FORMATS)
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state.name == s for t in trials)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    print(f"study {spec.name!r}: {stats.summary()}; the study holds {counts}; storage {url}")
    if top == 0 or args.verbose:
        print(text)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete and top:
        best = best_of(complete)
        print(f"best: trial {best.number}, valid_acc {best.value:.4f} ({params_text(best.params)})")
        if best_checkpoint_id(study, best):
            print(f"checkpoint: trial-{best.number}-best.pt in {study.user_attrs.get('artifacts')}")
        starved = budget_starved(study)
        if starved:
            print(starved)
    print("report: " + ", ".join(map(str, paths)))
    study_arg = study_handle(study)  # what finds this study; the data is recorded on it
    if complete and top:
        print(f"next: run-study train {study_arg} --trial best --set train.max_steps=N   (final fit)\n"
              f"      run-study predict {study_arg} --top-k {min(3, len(complete))} --out submission.csv\n"
              f"      run-study dashboard {study_arg}")
    else:
        print(f"next: run-study dashboard {study_arg}")


def _say_stop(stats, stream) -> None:
    """Why the loop stopped early (failures in a row); a reached target or deadline needs no words."""
    if stats.stop_reason and stats.stop_reason != "timeout":
        print(stats.stop_reason, file=stream)


def cmd_report(args: argparse.Namespace) -> None:
    from reports import FIGURE_FORMATS, FORMATS, write_comparison
    from search.storage import load_existing_study, results_dir
    from search.studyfile import SpecError

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SpecError(f"--format {args.format!r}: unknown format {unknown[0] if unknown else ''!r}; "
                        f"valid: {', '.join(FORMATS)}")
    figures = tuple(f.strip() for f in args.figures.split(",") if f.strip())
    unknown = [f for f in figures if f not in FIGURE_FORMATS]
    if unknown:
        raise SpecError(f"--figures {args.figures!r}: unknown format {unknown[0]!r}; "
                        f"valid: {', '.join(FIGURE_FORMATS)}")
    _check_positive("--top", args.top)
    found = [_find(name, args.storage) for name in args.studies]
    studies = [load_existing_study(name, url) for name, url, _ in found]
    out = args.out or results_dir(found[0][1], found[0][2])  # the (first) storage's own folder
    if len(studies) == 1:
        _print_report(studies[0], out, args.top, formats, figures)
    else:
        _print_written(*write_comparison(studies, out, formats, figures))


def cmd_dashboard(args: argparse.Namespace) -> None:
    from optuna_dashboard import run_server

    from search.artifact_store import STUDY_ATTR, study_artifact_store

    study = _load_study(args.study, args.storage)
    _check_port_free(args.host, args.port)
    print(f"optuna-dashboard on http://{args.host}:{args.port} (study {study.study_name!r}); Ctrl-C to stop")
    artifact_store = study_artifact_store(study) if STUDY_ATTR in study.user_attrs else None  # checkpoints
    run_server(study._storage, host=args.host, port=args.port, artifact_store=artifact_store)


def _check_port_free(host: str, port: int) -> None:
    """A busy port is one line, exit 2, before the server prints that it listens (it would fail after)."""
    import socket

    from search.studyfile import SpecError

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise SpecError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); another server "
                        f"(an optuna-dashboard already running?) may hold it: try --port {port + 1}") from None


def cmd_status(args: argparse.Namespace) -> None:
    import time

    from search.status import study_status

    print(study_status(_load_study(args.study, args.storage), time.time()))


def cmd_train(args: argparse.Namespace) -> None:
    import shlex

    from search.final import final_config, fit, pick_trial
    from search.origin import recorded_path
    from search.provenance import gpu_info
    from search.runner import handle_signals
    from search.studyfile import SpecError
    from search.train import default_device
    from search.workers import apply_placement, parse_gpus

    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as err:
        raise SpecError(str(err)) from None
    if len(gpus) > 1 and args.gpus not in (None, "auto"):
        raise SpecError(f"--gpus {args.gpus}: a final fit is one process on one GPU; give one index")
    handle_signals()
    study, spec, results = _load_study_and_spec(args.study, args.storage)
    trial = pick_trial(study, args.trial)
    cfg = final_config(trial, args.overrides)
    store = _data_for(study, spec, args.data)
    out = args.out or results / f"{study.study_name}-trial-{trial.number}-final.pt"
    apply_placement(None, None, gpus[0] if gpus else None, cpu_only=gpus == ())  # the same placement as workers'
    gpu = gpu_info(default_device())
    print(f"final fit of trial {trial.number} of study {study.study_name!r} (valid_acc "
          f"{_fmt(trial.value)} in the study): {cfg.train.max_steps} steps on "
          + (f"GPU {gpu['index']} ({gpu['name']})" if gpu else "the CPU"))
    source = {"study": study.study_name, "trial": trial.number, "overrides": args.overrides}
    result = fit(cfg, store, out, {**source, "gpu": gpu} if gpu else source)
    print(f"best valid_acc {result.best_valid_acc:.4f} at step {result.best_step}; saved {out}")
    data = args.data or recorded_path(study) or spec.data_path
    print(f"next: run-study predict {shlex.quote(str(out))} --data {shlex.quote(str(data))} --out submission.csv")


def cmd_predict(args: argparse.Namespace) -> None:
    from search import predict
    from search.origin import recorded_path
    from search.studyfile import SpecError

    _check_positive("--batch-size", args.batch_size)
    _check_positive("--top-k", args.top_k)
    _check_positive("--threads", args.threads)
    source = Path(args.source)
    if source.suffix == ".pt" or (source.is_file() and source.suffix != ".toml"):
        if args.trial or args.top_k:
            raise SpecError("--trial and --top-k choose trials of a study; a checkpoint file is one model")
        checkpoints, spec, study = [predict.from_file(source)], None, None
    else:
        study, spec, _ = _load_study_and_spec(args.source, args.storage)
        checkpoints = predict.from_study(study, args.trial, args.top_k)
    data = args.data or (recorded_path(study) if study else None) or (spec.data_path if spec else None)
    if data is None:
        raise SpecError("--data DIR is needed: the HW4 folder with testdata.json")
    checks = [predict.shape_check(c) for c in checkpoints]

    def same_shape(index, root) -> None:  # every checkpoint's n_mels and speakers, before anything is packed
        for check in checks:
            check(index, root)

    store = _open_data_folder(data, same_shape)
    if store.n_test == 0:
        raise SpecError(f"{data}/testdata.json: missing or empty; predict needs the test utterances")
    for checkpoint in checkpoints:
        predict.check_compatible(checkpoint, store, data, args.other_data)
    threads = predict.set_threads(checkpoints[0], store, args.threads)
    probs = predict.predict_proba(checkpoints, store, batch_size=args.batch_size, precision=args.precision)
    predicted = probs.argmax(axis=1)
    predict.write_submission(args.out, store, predicted)
    names = ", ".join(c.name for c in checkpoints)
    where = f"{threads} CPU thread{'s' if threads > 1 else ''}" if threads else "the GPU"
    print(f"wrote {args.out}: {len(predicted)} test utterances, {store.n_classes} speakers ({names}), on {where}")
    if args.labels:
        accuracy, n = predict.score(args.labels, store, predicted)
        print(f"accuracy {accuracy:.4f} on {n} labelled test utterances ({args.labels})")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_report(study, out: Path, top: int, formats: tuple[str, ...] | None = None, figures: tuple[str, ...] = ()
                  ) -> None:
    from reports import DEFAULT_FORMATS, write_report

    _print_written(*write_report(study, out, top, formats or DEFAULT_FORMATS, figures))


def _print_written(text: str, paths: list[Path]) -> None:
    print(text)
    print("wrote " + ", ".join(map(str, paths)))


def _load_study(study: str, storage: str | None):
    """report, dashboard, status: reads only the study file's name and storage, so no torch is imported."""
    from search.storage import load_existing_study

    name, url, _ = _find(study, storage)
    return load_existing_study(name, url)


def _load_study_and_spec(study: str, storage: str | None):
    """train, predict: the study, its validated spec (None when the study is named without its file) and the
    storage's results folder."""
    from search.spec import load_spec
    from search.storage import load_existing_study, results_dir

    name, url, anchor = _find(study, storage)
    path = _study_file(study)
    spec = load_spec(path) if path is not None else None
    return load_existing_study(name, url), spec, results_dir(url, anchor)


def _study_file(study: str) -> Path | None:
    """The study file a STUDY argument names: a path, or studies/NAME.toml for a bare NAME; None for a name."""
    path = Path(study)
    if path.suffix != ".toml" and not path.exists() and (Path("studies") / f"{study}.toml").exists():
        path = Path("studies") / f"{study}.toml"
    return path if path.suffix == ".toml" or path.exists() else None


def _find(study: str, storage: str | None) -> tuple[str, str, Path]:
    """(study name, storage URL, folder that anchors default outputs) of a STUDY argument: a study file (its
    name and storage, read without validating the rest) or a study name (with --storage, or studies/NAME.db,
    the default storage of a study renamed with --set study.name=NAME)."""
    from search.studyfile import SpecError, locate

    path = _study_file(study)
    if path is not None:
        name, url = locate(path)
        return name, storage or url, path.parent
    if storage is None and (Path("studies") / f"{study}.db").exists():
        storage = f"sqlite:///{Path('studies') / study}.db"
    if storage is None:
        raise SpecError(f"no study file {study!r}, no studies/{study}.db and no --storage; "
                        "give a studies/NAME.toml or --storage URL")
    return study, storage, Path.cwd()


def _data_for(study, spec, override: Path | None):
    """The dataset a study was run on: --data or the study file's; refused if it is other data."""
    from data import DataError
    from search.origin import recorded_path, study_shape
    from search.studyfile import SpecError

    override = override or recorded_path(study)  # the data it ran on, wherever the study file points
    if spec is None and override is None:
        raise SpecError(f"study {study.study_name!r} named without its study file: give --data DIR")
    check = study_shape(study)
    store = _open_data(spec, override, check=check) if spec is not None else _open_data_folder(override, check)
    expected = study.user_attrs.get("data_fingerprint")
    if expected and store.fingerprint != expected:
        raise DataError(f"{override or spec.data_path}: not the dataset study {study.study_name!r} was run on "
                        f"(fingerprint {store.fingerprint}, the study's {expected})")
    return store


def _open_data_folder(path: Path, check=None):
    """The folder's store; `check(index, root)` refuses it from its JSON files, before anything is packed."""
    from data import DataError, open_store

    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found (a HW4 folder holds metadata.json and mapping.json)")
    return open_store(path, check=check)


def _open_data(spec, override: Path | None, quiet: bool = False, check=None):
    from data.synthetic import make_synthetic
    from search.studyfile import SpecError

    path = override or spec.data_path
    if path is None:
        raise SpecError(f"{spec.path}: no dataset; give --data DIR or data.path in the study file")
    if not path.exists() and spec.synthetic and override is None:
        if not quiet:
            print(f"generating synthetic dataset {path} ({spec.synthetic})")
        try:
            make_synthetic(path, **spec.synthetic)
        except TypeError as err:
            raise SpecError(f"{spec.path}: data.synthetic: {err}") from None
    return _open_data_folder(path, check)


def _check_positive(flag: str, value: float | None) -> None:
    from search.studyfile import SpecError

    if value is not None and value <= 0:
        raise SpecError(f"{flag}={value} must be positive")


if __name__ == "__main__":
    sys.exit(main())
