"""`run-study report A B`: studies side by side name the settings they differ in, and read like the other reports."""
import re

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from reports import write_comparison
from search.attrs import RUN_CONFIG, split_attr
from search.config import RunConfig


def _search(name: str, max_steps: int, fingerprint: str = "0123456789abcdef") -> optuna.Study:
    """A search as `run-study search` stores it: the spec (study file + --set) on the study, each trial's run
    config in parts, its parameter count."""
    study = optuna.create_study(study_name=name, direction="maximize")
    study.set_user_attr("spec", {
        "model": {"d_model": {"choices": [32, 64]}, "pooling": {"value": "mean"}}, "when": {},
        "train": {"lr": {"low": 0.0003, "high": 0.005, "log": True, "step": None}, "max_steps": {"value": max_steps}},
        "data": {"valid_fraction": 0.1, "split_seed": 0, "valid_mode": "fixed"}})
    study.set_user_attr("data_fingerprint", fingerprint)
    dist = {"d_model": CategoricalDistribution([32, 64])}
    for value, d_model in ((0.25, 32), (0.2667, 64)):
        cfg = RunConfig().to_dict()
        cfg["model"].update(d_model=d_model, pooling="mean")
        cfg["train"]["max_steps"] = max_steps
        study.add_trial(create_trial(params={"d_model": d_model}, distributions=dist, value=value,
                                     user_attrs={"n_params": 11176, **split_attr(RUN_CONFIG, cfg)}))
    return study


def _md_table(text: str, title: str | None) -> list[list[str]]:
    """The rows of the table under `## title` (None: the first table, under the report's title)."""
    block = (text.split(f"## {title}")[1] if title else text).split("\n## ")[0]
    rows = [line for line in block.splitlines() if line.startswith("|") and not set(line) <= set("|:- ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_side_by_side_names_the_settings_that_differ(tmp_path):
    text, paths = write_comparison([_search("short", 20), _search("long", 40)], tmp_path, ("md", "csv"))
    differ = _md_table(text, "Settings that differ")
    assert differ == [["setting", "short", "long"], ["train.max_steps", "20", "40"]]  # and nothing they share

    other_data = _search("other", 20, fingerprint="fedcba9876543210")
    text, _ = write_comparison([_search("short", 20), other_data], tmp_path, ("md",))
    assert _md_table(text, "Settings that differ") == [["setting", "short", "other"],
                                                       ["data (fingerprint)", "0123456789ab", "fedcba987654"]]
    same, _ = write_comparison([_search("a", 20), _search("b", 20)], tmp_path, ("md",))
    assert "## Settings that differ\n\nNone: the studies were made from the same settings" in same


def test_side_by_side_csv_headers_are_snake_case_and_counts_read_as_elsewhere(tmp_path):
    text, paths = write_comparison([_search("short", 20), _search("long", 40)], tmp_path, ("md", "csv"))
    header = pd.read_csv(paths[1], nrows=0).columns.tolist()
    assert header == ["study", "kind", "complete", "pruned", "failed", "best_valid_acc", "mean_valid_acc",
                      "best_trial", "best_n_params", "trial_hours"]
    assert all(re.fullmatch(r"[a-z0-9_]+", column) for column in header)
    assert pd.read_csv(paths[1])["best_n_params"].tolist() == [11176, 11176]  # the CSV keeps the number
    overview = _md_table(text, None)
    column = overview[0].index("best_n_params")
    assert [row[column] for row in overview[1:]] == ["11.2 k", "11.2 k"]  # si_count, as every other report
