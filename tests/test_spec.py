from pathlib import Path

import optuna
import pytest

from search.spec import SpecError, load_spec
from search.studyfile import apply_override
from tests.conftest import write_study

STUDIES = sorted(Path(__file__).resolve().parent.parent.joinpath("studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_files_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem


def test_lists_are_choices_tables_are_ranges_and_scalars_are_fixed(tmp_path):
    spec = load_spec(write_study(tmp_path / "s.toml", """
[model]
d_model = [16, 32]
nhead = 2
n_layers = { low = 1, high = 3 }
[train]
lr = { low = 1e-4, high = 1e-2, log = true }
max_steps = 10
"""))
    assert spec.model["d_model"].choices == (16, 32)
    assert not spec.model["nhead"].searched
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        cfg = spec.run_config(trial)
        assert cfg.model.d_model in (16, 32) and cfg.model.nhead == 2
        assert 1 <= cfg.model.n_layers <= 3 and isinstance(cfg.model.n_layers, int)
        assert 1e-4 <= cfg.train.lr <= 1e-2 and cfg.train.max_steps == 10
        assert cfg.train.seed == trial.number  # study seed 0 + trial number
        assert set(trial.params) == {"d_model", "n_layers", "lr"}
        study.tell(trial, 0.0)


def test_head_dim_makes_every_sampled_pair_valid(tmp_path):
    spec = load_spec(write_study(tmp_path / "s.toml", """
[model]
nhead = [1, 2, 4, 8]
head_dim = [8, 12, 16]
"""))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        cfg = spec.run_config(trial)
        assert cfg.model.d_model == trial.params["nhead"] * trial.params["head_dim"]
        seen.add((cfg.model.d_model, cfg.model.nhead))
        study.tell(trial, 0.0)
    assert len(seen) > 5


def test_overrides_parse_values_as_toml_or_plain_strings():
    raw: dict = {"train": {"max_steps": 100}}
    apply_override(raw, "train.max_steps=20")
    apply_override(raw, "model.d_model=[32, 64]")
    apply_override(raw, "pruner.name=hyperband")
    apply_override(raw, "data.synthetic.speakers=5")
    assert raw == {
        "train": {"max_steps": 20}, "model": {"d_model": [32, 64]}, "pruner": {"name": "hyperband"},
        "data": {"synthetic": {"speakers": 5}},
    }


@pytest.mark.parametrize(
    ("body", "overrides", "fragment"),
    [
        ("[modle]\n", (), "unknown section modle; valid: study, data"),
        ("[model]\npoolng = 'mean'\n", (), "unknown key model.poolng; valid keys: encoder, d_model"),
        ("[model]\nd_model = [64, 80]\nnhead = [2, 3]\n", (), "model.nhead=3 does not divide model.d_model=64"),
        ("[model]\nd_model = 64\nhead_dim = 8\n", (), "give model.d_model or model.head_dim"),
        ("[model]\nd_model = { low = 16, high = 64, log = true }\nnhead = [4]\n", (),
         "model.nhead=4 does not divide model.d_model=17 (a value its range can produce)"),
        ("[model]\nd_model = { low = 16, high = 64, step = 8 }\nnhead = 2\n", ("model.nhead=[2, 16]",),
         "model.nhead=16 does not divide model.d_model=24"),
        ("[model]\nencoder = 'conformer'\nconv_kernel = { low = 3, high = 15 }\n", (),
         "model.conv_kernel=4 must be a positive odd integer"),
        ("[model]\npooling = ['mean', 'attn']\n", (), "model.pooling='attn' is not a known pooling"),
        ("[train]\nlr = { low = 1e-2, high = 1e-4 }\n", (), "low and high must be numbers with low <= high"),
        ("[train]\nlr = { low = 1e-4 }\n", (), "a range is a table with low, high"),
        ("[train]\nmax_steps = -5\n", (), "train.max_steps=-5 must be a positive integer"),
        ("[train]\nbatch_size = [16, 16]\n", (), "without repeats"),
        ("", ("study.n_trials=0",), "study.n_trials=0 must be a positive number"),
        ("", ("study.workers=0",), 'study.workers=0 must be a positive integer or "auto"'),
        ("", ("study.workers=all",), "study.workers='all' must be a positive integer"),
        ("", ("data.valid_fraction=1.5",), "data.valid_fraction=1.5 must be a number in (0, 1)"),
        ("", ("data.valid_mode=random",), "data.valid_mode='random' must be one of fixed, full"),
        ("", ("train.max_steps",), "must look like section.key=value"),
        ("", ("optimizer.lr=1",), "unknown section 'optimizer'"),
        ("[model\n", (), "not valid TOML"),
    ],
)
def test_bad_study_file_gives_one_line_error_naming_file_and_key(tmp_path, body, overrides, fragment):
    path = write_study(tmp_path / "bad.toml", body)
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith(str(path)) or message.startswith("--set")


def test_missing_study_file(tmp_path):
    with pytest.raises(SpecError, match="study file not found"):
        load_spec(tmp_path / "nope.toml")


CONDITIONAL = """
[model]
d_model = 16
nhead = 2
head = ["linear", "mlp-32"]
head_dropout = 0.0
[model.when.head.mlp-32]
head_dropout = { low = 0.0, high = 0.5 }
head_activation = ["relu", "gelu"]
"""


def test_conditional_keys_are_sampled_only_when_their_parent_choice_is_active(tmp_path):
    spec = load_spec(write_study(tmp_path / "c.toml", CONDITIONAL))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    heads = set()
    for _ in range(30):
        trial = study.ask()
        cfg = spec.run_config(trial)
        heads.add(cfg.model.head)
        if cfg.model.head == "mlp-32":
            assert {"head_dropout", "head_activation"} <= set(trial.params)
            assert cfg.model.head_dropout == trial.params["head_dropout"]
        else:
            assert "head_dropout" not in trial.params and "head_activation" not in trial.params
            assert cfg.model.head_dropout == 0.0 and cfg.model.head_activation == "relu"
        study.tell(trial, 0.0)
    assert heads == {"linear", "mlp-32"}


def test_a_key_defined_differently_in_two_branches_gets_qualified_names(tmp_path):
    spec = load_spec(write_study(tmp_path / "q.toml", """
[model]
head = ["mlp-8", "mlp-16"]
[model.when.head.mlp-8]
head_dropout = { low = 0.0, high = 0.2 }
[model.when.head.mlp-16]
head_dropout = { low = 0.1, high = 0.5 }
"""))
    assert spec.when["head"]["mlp-8"]["head_dropout"].name == "head_dropout@head=mlp-8"
    assert spec.when["head"]["mlp-16"]["head_dropout"].name == "head_dropout@head=mlp-16"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("[model]\nhead = ['linear']\n[model.when.head.mlp-8]\nhead_dropout = 0.1\n",
         "model.when.head.mlp-8: 'mlp-8' is not a choice of model.head; choices: linear"),
        ("[model.when.pooling.mean]\nhead_dropout = 0.1\n", "model.pooling must be set in [model]"),
        ("[model]\nhead = ['linear', 'mlp-8']\nhead_dropout = [0.0, 0.1]\n"
         "[model.when.head.mlp-8]\nhead_dropout = 0.2\n", "model.head_dropout is already searched"),
        ("[model]\nhead = ['linear', 'mlp-8']\n[model.when.head.mlp-8]\nhead_dropout = 2.0\n",
         "model.head_dropout=2.0 must be a number in [0, 1)"),
        ("[model]\nhead = ['linear', 'mlp-8']\n[model.when.head.mlp-8]\nnhead = 4\n", "nhead cannot be conditional"),
    ],
)
def test_bad_conditions_are_refused(tmp_path, body, fragment):
    with pytest.raises(SpecError) as err:
        load_spec(write_study(tmp_path / "bad.toml", body))
    assert fragment in str(err.value)


def test_a_margin_loss_without_the_cosine_classifier_fails_at_load(tmp_path):
    with pytest.raises(SpecError, match="model.loss='am_softmax' needs model.classifier='cosine'"):
        load_spec(write_study(tmp_path / "m.toml", "[model]\nloss = ['ce', 'am_softmax']\n"))
    spec = load_spec(write_study(tmp_path / "ok.toml", """
[model]
loss = ['ce', 'am_softmax']
[model.when.loss.am_softmax]
classifier = "cosine"
margin = { low = 0.1, high = 0.3 }
"""))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        cfg = spec.run_config(trial)
        assert cfg.model.classifier == ("cosine" if cfg.model.loss == "am_softmax" else "linear")
        study.tell(trial, 0.0)


@pytest.mark.parametrize("name", ["sample", "medium", "strong", "boss"])
def test_presets_default_model_builds_and_runs(name):
    import torch

    from models import build_model

    path = Path(__file__).resolve().parent.parent / "studies" / f"{name}.toml"
    cfg = load_spec(path).default_run_config()
    model = build_model(cfg.model, n_mels=40, n_classes=600).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 50, 40), torch.tensor([50, 20]))
    assert logits.shape == (2, 600) and torch.isfinite(logits).all()
    assert cfg.train.max_steps == 70000 and cfg.train.batch_size == 32  # sized for a GPU


def test_sample_preset_is_the_official_sample_model():
    cfg = load_spec(Path(__file__).resolve().parent.parent / "studies" / "sample.toml").default_run_config()
    m = cfg.model
    assert (m.encoder, m.d_model, m.nhead, m.n_layers) == ("transformer", 80, 2, 1)
    assert (m.dim_feedforward, m.dropout) == (256, 0.1)
    assert (m.pooling, m.head, m.head_activation, m.classifier, m.loss) == ("mean", "mlp-80", "sigmoid", "linear", "ce")
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.valid_steps, cfg.train.seed) == (1e-3, 1000, 2000, 87)


def _cpu_command(path: Path) -> list[str]:
    """The preset's 'CPU' command from its header comment, continuation lines joined."""
    import shlex

    lines = path.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    header = " ".join(line[1:].strip() for line in lines[:end])
    return shlex.split(header.split("CPU", 1)[1].split("run-study ", 1)[1].replace("\\ ", ""))


@pytest.mark.parametrize("name", ["sample", "medium", "strong", "boss", "boss_ablation"])
def test_presets_cpu_lines_are_valid_commands_with_a_time_or_step_budget_for_a_cpu(name):
    """Each GPU-sized preset states a CPU command: it must parse, its overrides must load, and it must not
    ask for GPU-length trials (70k steps) unless a time budget cuts them."""
    import run_study

    path = Path(__file__).resolve().parent.parent / "studies" / f"{name}.toml"
    args = run_study._parser().parse_args(_cpu_command(path))
    assert Path(args.study).name == path.name and str(args.data) == "Dataset"
    spec = load_spec(path, args.overrides)
    cfg = spec.default_run_config()
    assert cfg.train.max_minutes > 0 or cfg.train.max_steps <= 5000
    if args.command == "search" and name != "sample":
        assert args.timeout == 1200 and args.workers == "auto"


@pytest.mark.parametrize("model", [
    {"encoder": "transformer"},
    {"encoder": "conformer", "conv_kernel": 15, "pooling": "attentive_stats", "pool_hidden": 64},
    {"encoder": "none", "prenet": False, "pooling": "stats"},
    {"loss": "am_softmax", "classifier": "cosine", "scale": 20.0, "margin": 0.3, "head": "mlp-32"},
])
def test_a_shown_run_config_lists_only_the_keys_that_shape_the_model_and_reads_back_the_same(model):
    from search.config import RunConfig

    cfg = RunConfig.from_dict({"model": model})
    shown = cfg.to_shown_dict()["model"]
    assert RunConfig.from_dict(cfg.to_shown_dict()) == cfg
    conformer_keys = {"conv_kernel", "conv_expansion", "attn_dropout", "conv_dropout"}
    assert (conformer_keys <= set(shown)) == (model["encoder"] == "conformer" if "encoder" in model else False)
    assert ("margin" in shown) == (model.get("loss") == "am_softmax")
    assert ("pool_hidden" in shown) == (model.get("pooling") == "attentive_stats")
    assert ("head_activation" in shown) == (model.get("head", "linear") != "linear")
    assert set(model) <= set(shown)  # what was set is always shown
