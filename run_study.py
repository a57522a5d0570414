"""run-study: search, ablate and report on speaker-classification models (ML2023Spring HW4 format).

Exit codes: 0 done; 1 every trial this run started failed; 2 bad input (one line `error: ...` on stderr,
nothing stored); 130 / 143 stopped by SIGINT / SIGTERM (running trials marked failed, retried next run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1  # every trial this run started failed
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse prints usage too)
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    from data import DataError
    from models import ConfigError
    from search.runner import exit_code
    from search.spec import SpecError

    try:
        return args.func(args) or 0
    except (DataError, SpecError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        code = exit_code(interrupt)
        if getattr(args, "worker_id", None) is None:  # workers stay quiet: their parent says it once
            name = "SIGTERM" if code == EXIT_TERMINATED else "SIGINT"
            print(f"interrupted ({name}): running trials are marked failed (reason 'interrupted') and rerun by "
                  "the next run; finished trials are stored. Run the same command again to resume", file=sys.stderr)
        return code


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("make-data", help="write a synthetic dataset in the HW4 format")
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--utterances-per-speaker", type=int, default=60)
    p.add_argument("--n-mels", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("pack", help="validate a HW4 folder and build its packed memory-mapped store")
    p.add_argument("data", type=Path, help="HW4 folder (metadata.json, mapping.json, uttr-*.pt)")
    p.add_argument("--cache-dir", type=Path, help="where to put the pack (default: DATA/.hw4pack)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("search", help="create or resume a study and run trials")
    _add_run_options(p, "study file, e.g. studies/quickstart.toml", "model.d_model=[64,128]")
    p.add_argument("--n-trials", type=int, help="finished (complete or pruned) trials the study should hold; failed "
                                                "ones do not count (overrides study.n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ablate", help="run or resume an ablation: fixed variants x seeds, then its table")
    _add_run_options(p, "ablation study file, e.g. studies/boss_ablation.toml", "ablation.seeds=[0,1,2]")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="print a study's top trials (or ablation table), or several studies side by "
                                      "side, and write Markdown, CSV, LaTeX, offline HTML with figures")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="study file or study name; several: side by side")
    p.add_argument("--storage", help="storage URL (default: from the study file)")
    p.add_argument("--out", type=Path, help="output folder (default: results/STUDY, results/A-vs-B for several)")
    p.add_argument("--top", type=int, default=10, help="how many trials to list")
    p.add_argument("--format", default="md,csv,html",
                   help="comma-separated: md, csv, tex (LaTeX, booktabs), html (offline, with figures)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="open the study storage in optuna-dashboard")
    p.add_argument("study", help="study file or study name")
    p.add_argument("--storage", help="storage URL (default: from the study file)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)
    return parser


def _add_run_options(p: argparse.ArgumentParser, study_help: str, example: str) -> None:
    """The options shared by the commands that train: search and ablate."""
    p.add_argument("study", type=Path, help=study_help)
    p.add_argument("--data", type=Path, help="HW4 folder (overrides data.path)")
    p.add_argument("--storage", help="storage URL (default: sqlite file beside the study file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a study-file value, e.g. train.max_steps=200 or {example}")
    p.add_argument("--workers", default="1", metavar="N",
                   help="local worker processes on this study (default 1; 'auto' = one per usable core); each "
                        "gets cores // N torch threads and its own cores. More machines: run the same command "
                        "there with the same --storage")
    for hidden in ("--worker-id", "--threads"):  # set by the parent for its workers
        p.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpus", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)


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
    from search.spec import SpecError, load_spec
    from search.study import run_study

    spec = load_spec(args.study, args.overrides)
    if spec.is_ablation:
        raise SpecError(f"{spec.path}: this is an ablation study file; run it with: run-study ablate {spec.path}")
    _check_positive("--n-trials", args.n_trials)
    _check_positive("--timeout", args.timeout)
    n_trials = args.n_trials or spec.n_trials
    if n_trials is None and not (args.timeout or spec.timeout):
        n_trials = 10

    def setup(study) -> None:
        from search.runner import retry_interrupted

        queued = retry_interrupted(study)
        if queued:
            print(f"{queued} interrupted trial(s) queued again with the same parameters")

    return _run(args, spec, args.timeout or spec.timeout, setup,
                lambda study, store, deadline: run_study(study, spec, store, n_trials, deadline), top=5)


def cmd_ablate(args: argparse.Namespace) -> int:
    from search.ablation import enqueue_missing_cells, load_ablation, open_ablation, run_ablation

    ablation = load_ablation(args.study, args.overrides)
    rows: dict = {}

    def open_study(url: str, fingerprint: str):
        study, opened = open_ablation(ablation, url, fingerprint)
        rows.update(opened)
        return study

    def setup(study) -> None:
        queued = enqueue_missing_cells(study, ablation, rows)
        print(f"{queued} cell(s) queued of {len(rows) * len(ablation.seeds)}")

    return _run(args, ablation.study, None, setup,
                lambda study, store, deadline: run_ablation(study, ablation, rows, store, deadline), top=0,
                open_study=open_study)


def _run(args, spec, timeout, setup, run, top: int, open_study=None) -> int:
    """What search and ablate share: data, storage, study; then this process or N workers run trials."""
    import time

    from search.runner import RunStats, gate, handle_signals
    from search.spec import SpecError
    from search.storage import default_storage_url
    from search.strategies import make_pruner, make_sampler
    from search.study import create_or_resume
    from search.workers import Workers, apply_placement, parse_workers

    handle_signals()  # only where trials run: SIGINT/SIGTERM must mark them failed, not leave them RUNNING
    try:
        n_workers = parse_workers(args.workers)
    except ValueError as err:
        raise SpecError(str(err)) from None
    make_sampler(spec), make_pruner(spec)  # bad arguments: one line now, before any data or storage work
    store = _open_data(spec, args.data, quiet=args.worker_id is not None)
    url = args.storage or spec.storage or default_storage_url(spec)
    study = (open_study or (lambda u, fp: create_or_resume(spec, u, fp)))(url, store.fingerprint)
    deadline = args.deadline or (time.time() + timeout if timeout else None)
    if args.worker_id is not None:  # a worker started by the command below: run, say nothing more
        apply_placement(args.threads, args.cpus)
        stats = run(study, store, deadline)
        _say_stop(stats, sys.stdout)  # stdout: the parent prefixes it with the worker id
        return EXIT_FAILED if stats.all_failed else 0

    with gate(study):
        setup(study)
    if n_workers > 1:
        workers = Workers(args.argv, n_workers, deadline)
        print(f"{n_workers} workers on study {spec.name!r} ({workers.describe()})")
        codes = workers.wait()
        stats = RunStats.of(study, workers.names)
        if EXIT_USAGE in codes:
            return EXIT_USAGE
    else:
        apply_placement(None, None)
        stats = run(study, store, deadline)
        _say_stop(stats, sys.stderr)
    print(f"study {spec.name!r}: {stats.summary()}; storage {url}")
    _print_report(study, Path("results") / spec.name, top=top)
    print(f"dashboard: optuna-dashboard {url}")
    return EXIT_FAILED if stats.all_failed else 0


def _say_stop(stats, stream) -> None:
    """Why the loop stopped early (failures in a row); a reached target or deadline needs no words."""
    if stats.stop_reason and stats.stop_reason != "timeout":
        print(stats.stop_reason, file=stream)


def cmd_report(args: argparse.Namespace) -> None:
    from reports import FORMATS, comparison_name, write_comparison
    from search.spec import SpecError

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SpecError(f"--format {args.format!r}: unknown format {unknown[0] if unknown else ''!r}; "
                        f"valid: {', '.join(FORMATS)}")
    _check_positive("--top", args.top)
    studies = [_load_study(name, args.storage) for name in args.studies]
    if len(studies) == 1:
        _print_report(studies[0], args.out or Path("results") / studies[0].study_name, args.top, formats)
    else:
        _print_written(*write_comparison(studies, args.out or Path("results") / comparison_name(studies), formats))


def cmd_dashboard(args: argparse.Namespace) -> None:
    from optuna_dashboard import run_server

    study = _load_study(args.study, args.storage)
    print(f"optuna-dashboard on http://{args.host}:{args.port} (study {study.study_name!r}); Ctrl-C to stop")
    run_server(study._storage, host=args.host, port=args.port)


def _print_report(study, out: Path, top: int, formats: tuple[str, ...] | None = None) -> None:
    from reports import DEFAULT_FORMATS, write_report

    _print_written(*write_report(study, out, top, formats or DEFAULT_FORMATS))


def _print_written(text: str, paths: list[Path]) -> None:
    print(text)
    print("wrote " + ", ".join(map(str, paths)))


def _load_study(study: str, storage: str | None):
    """A study named by its study file (storage from the file) or by name (with --storage, studies/NAME.toml
    or the default storage studies/NAME.db, e.g. a study renamed with --set study.name=NAME)."""
    from search.spec import SpecError, load_spec
    from search.storage import default_storage_url, load_existing_study

    path = Path(study)
    if path.suffix != ".toml" and not path.exists() and (Path("studies") / f"{study}.toml").exists():
        path = Path("studies") / f"{study}.toml"
    if path.suffix == ".toml" or path.exists():
        spec = load_spec(path)
        return load_existing_study(spec.name, storage or spec.storage or default_storage_url(spec))
    if storage is None and (Path("studies") / f"{study}.db").exists():  # the default storage of a study NAME
        storage = f"sqlite:///{Path('studies') / study}.db"
    if storage is None:
        raise SpecError(f"no study file {study!r}, no studies/{study}.db and no --storage; "
                        "give a studies/NAME.toml or --storage URL")
    return load_existing_study(study, storage)


def _open_data(spec, override: Path | None, quiet: bool = False):
    from data import DataError, open_store
    from data.synthetic import make_synthetic
    from search.spec import SpecError

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
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found (a HW4 folder holds metadata.json and mapping.json)")
    return open_store(path)


def _check_positive(flag: str, value: float | None) -> None:
    from search.spec import SpecError

    if value is not None and value <= 0:
        raise SpecError(f"{flag}={value} must be positive")


if __name__ == "__main__":
    sys.exit(main())
