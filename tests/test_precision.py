"""train.precision: the per-machine probe, its decision rule and cache, fp32 numerics under bf16 autocast, and
parity of fp32 and bf16 runs (search.precision)."""
import dataclasses
import json
import statistics

import pytest
import torch

import run_study
from models import ConfigError, ModelConfig, build_model
from models.pooling import masked_softmax
from search import precision as P
from search.config import DataConfig, RunConfig, TrainConfig
from search.predict import Checkpoint, predict_proba
from search.train import train

CPU = torch.device("cpu")


def tiny(precision: str = "auto", seed: int = 1, steps: int = 120, **model) -> RunConfig:
    return RunConfig(
        model=ModelConfig(**{"d_model": 32, "nhead": 2, "ff_mult": 2.0, "dropout": 0.0, **model}),
        train=TrainConfig(max_steps=steps, valid_steps=steps // 3, warmup_steps=10, lr=3e-3, segment_len=48,
                          batch_size=16, seed=seed, precision=precision),
        data=DataConfig(valid_fraction=0.25),
    )


def result_of(default: float, onednn: float, bf16: float, onednn_error: float = 3e-7) -> P.ProbeResult:
    timings = (P.RouteTiming("default", default, 3e-7), P.RouteTiming("onednn", onednn, onednn_error),
               P.RouteTiming("bf16", bf16, 3e-3))
    return P.ProbeResult("k", 1, timings, 0.1)


def test_the_decision_takes_the_fastest_exact_fp32_route_and_bf16_only_where_it_pays():
    # oneDNN fp32-exact and faster (AMD AVX-512): the fp32 route; bf16 1.4x that is not enough
    assert result_of(10, 18, 25).decision() == P.Precision("fp32", "onednn")
    # oneDNN computing in bf16 (AMX): never taken as fp32, however fast; bf16 at 2x the default is taken
    assert result_of(10, 30, 20, onednn_error=2e-3).decision() == P.Precision("bf16", "default")
    # no native bf16 (50x slower): fp32 on the default route
    assert result_of(10, 9, 0.2).decision() == P.Precision("fp32", "default")
    assert result_of(10, 9, 15).decision().dtype == "bf16"  # exactly the 1.5x bar
    # oneDNN exact but within probe noise of the default (AVX2 EPYC, d64/d80: 0.92x-1.08x): the default route
    assert result_of(10, 12, 0.2).decision() == P.Precision("fp32", "default")
    assert result_of(10, 12.5, 0.2).decision() == P.Precision("fp32", "onednn")  # exactly the bar
    assert P.Precision("fp32", "onednn").label == "fp32 (oneDNN)" and P.Precision("bf16").label == "bf16"


def test_explicit_precisions_and_train_amp_false_need_no_probe(monkeypatch):
    monkeypatch.setattr(P, "probe", lambda *a, **k: result_of(10, 9, 30))
    assert P.resolve(tiny("bf16"), CPU, 16, 8) == P.Precision("bf16")
    assert P.resolve(tiny("fp32"), CPU, 16, 8) == P.Precision("fp32")  # fp32 stays fp32 where bf16 would pay
    assert P.resolve(tiny("auto"), CPU, 16, 8) == P.Precision("bf16")
    no_amp = dataclasses.replace(tiny("auto"), train=dataclasses.replace(tiny().train, amp=False))
    assert P.resolve(no_amp, CPU, 16, 8) == P.Precision("fp32")
    with pytest.raises(ConfigError, match=r"train.precision='bf32' must be one of auto, fp32, bf16, fp16"):
        TrainConfig(precision="bf32")


def test_the_probe_measures_this_cpu_once_and_leaves_the_callers_state_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path))
    cfg = tiny()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    first = P.probe(cfg, 16, 8, threads=1)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert {t.route for t in first.timings} == {"default", "onednn", "bf16"}
    assert all(t.steps_per_cpu_s > 0 for t in first.timings)
    assert first.timing("default").rel_error < P.FP32_LEVEL < first.timing("bf16").rel_error  # real float64 check
    assert first.predict_threads == 1 and first.key == P.probe_key(cfg, 16, 8)

    def no_second_probe(*args):
        raise AssertionError("measured again: the cache was not used")

    monkeypatch.setattr(P, "measure", no_second_probe)
    assert P.probe(cfg, 16, 8, threads=1) == first
    # dropout and loss do not change a step's cost: the same entry; d_model does
    assert P.probe(tiny(dropout=0.1, loss="am_softmax", classifier="cosine"), 16, 8, threads=1) == first
    with pytest.raises(AssertionError, match="cache was not used"):
        P.probe(tiny(d_model=48), 16, 8, threads=1)
    (tmp_path / "precision.json").write_text("{not json")  # a damaged cache is measured again, not an error
    monkeypatch.setattr(P, "measure", lambda *a: first)
    assert P.probe(cfg, 16, 8, threads=1) == first
    assert json.loads((tmp_path / "precision.json").read_text())  # and rewritten whole


@pytest.mark.parametrize("bf16_matmul_ratio", [0.02, 1.0])
def test_bf16_steps_are_timed_only_where_bf16_matmuls_are_not_far_slower(monkeypatch, bf16_matmul_ratio):
    """Without native bf16 (AVX2: 0.02x) a d512 bf16 step takes seconds: timing 4 of them made the probe 103 s.
    The matmul check skips them and estimates the route from the matmuls; elsewhere the steps are timed."""
    timed_routes = []
    real_step = P.training_step

    def counting_step(model, optimizer, x, lengths, y, precision):
        timed_routes.append(precision.dtype + "/" + precision.route)
        return real_step(model, optimizer, x, lengths, y, precision)

    def matmul_cost(matmul):  # this machine's real ratio aside; bf16 autocast is on while bf16's is timed
        matmul()
        return 1e-3 / bf16_matmul_ratio if torch.is_autocast_enabled("cpu") else 1e-3

    monkeypatch.setattr(P, "training_step", counting_step)
    monkeypatch.setattr(P, "_matmul_cost", matmul_cost)
    result = P.measure(tiny(), 16, 8, threads=1)
    bf16 = result.timing("bf16")
    if bf16_matmul_ratio < P.BF16_MATMUL_FLOOR:
        assert timed_routes == ["fp32/default", "fp32/onednn"] and not bf16.timed
        assert result.bf16_speedup < 0.1 and result.decision().dtype == "fp32"
    else:
        assert timed_routes == ["fp32/default", "fp32/onednn", "bf16/default"] and bf16.timed
    assert bf16.rel_error > P.FP32_LEVEL and bf16.steps_per_cpu_s > 0


def test_margin_cosines_softmax_and_the_loss_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    x, lengths = torch.randn(4, 20, 16), torch.tensor([20, 15, 9, 3])
    for loss, classifier, pooling in (("aam_softmax", "cosine", "attentive_stats"), ("ce", "linear", "attention")):
        model = build_model(ModelConfig(d_model=32, nhead=2, loss=loss, classifier=classifier, pooling=pooling),
                            16, 8)
        with P.Precision("bf16").autocast(CPU):
            logits = model(x, lengths)
            weights = model.pooling.weights(model.prenet(x), torch.arange(20)[None] >= lengths[:, None])
        assert weights.dtype == torch.float32
        if classifier == "cosine":
            assert logits.dtype == torch.float32  # the margin acts on fp32 cosines
        assert model.criterion(logits.float(), torch.tensor([0, 1, 2, 3])).dtype == torch.float32
    scores = torch.randn(2, 5, dtype=torch.bfloat16)
    assert masked_softmax(scores, torch.zeros(2, 5, dtype=torch.bool)).dtype == torch.float32


def test_fp32_and_bf16_runs_reach_the_same_accuracy_over_seeds(tiny_store):
    """Parity shown, not assumed: the same config and seeds in fp32 and in bf16 autocast. Tolerance: the mean
    paired difference within 0.1 (this tiny set's seed-to-seed spread is about that) and bf16 learning as well."""
    fp32, bf16 = [], []
    for seed in (1, 2, 3):
        fp32.append(train(tiny("fp32", seed), tiny_store).best_valid_acc)
        run = train(tiny("bf16", seed), tiny_store)
        assert run.precision == "bf16"
        bf16.append(run.best_valid_acc)
    chance = 1 / tiny_store.n_classes
    assert min(bf16) > 3 * chance and min(fp32) > 3 * chance
    assert abs(statistics.mean(a - b for a, b in zip(fp32, bf16, strict=True))) <= 0.1, (fp32, bf16)


def test_a_bf16_trained_checkpoint_predicts_in_fp32_and_bf16(tiny_store):
    cfg = tiny("bf16", steps=60)
    run = train(cfg, tiny_store)
    checkpoint = Checkpoint("bf16 run", {"config": cfg.to_dict(), "model": run.best_state})
    in_fp32 = predict_proba([checkpoint], tiny_store, CPU, precision="fp32")
    in_bf16 = predict_proba([checkpoint], tiny_store, CPU)  # the checkpoint's own: bf16
    assert in_fp32.shape == (tiny_store.n_test, tiny_store.n_classes)
    assert abs(in_fp32 - in_bf16).max() < 0.05
    assert (in_fp32.argmax(1) == in_bf16.argmax(1)).mean() >= 0.9


def test_the_cli_offers_what_train_precision_accepts():
    assert run_study.PREDICT_PRECISIONS == P.PRECISIONS
