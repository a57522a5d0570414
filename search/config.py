"""RunConfig: everything one training run needs besides the data, plain, frozen and serialisable."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from data.batches import VALID_MODES
from models import ConfigError, ModelConfig
from models.config import known_keys
from search.precision import PRECISIONS


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 70_000
    valid_steps: int = 2_000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 1_000
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    segment_len: int = 128
    seed: int = 87
    amp: bool = True  # false: fp32 whatever precision says (the older switch, kept for study files that use it)
    # "auto": measured per machine (search.precision): bf16 on CPUs where it is native and pays, else fp32 through
    # the fastest fp32-exact matmul route; on CUDA autocast (bf16, or fp16 where the GPU has no bf16).
    precision: str = "auto"
    # A time budget per trial (0: none): after the first evaluation window the run is sized to the steps that
    # fit, measured at its own speed (at most max_steps), and the LR schedule ends there.
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        for key in ("max_steps", "valid_steps", "batch_size", "segment_len"):
            _check(self, key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
        _check(self, "warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _check(self, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        _check(self, "lr", lambda v: _number(v) and v > 0, "a positive number")
        for key in ("weight_decay", "grad_clip", "max_minutes"):
            _check(self, key, lambda v: _number(v) and v >= 0, "a number >= 0")
        _check(self, "amp", lambda v: isinstance(v, bool), "true or false")
        _check(self, "precision", lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class DataConfig:
    """How the labelled utterances are split and validated; the same for every trial of a study."""

    valid_fraction: float = 0.1
    split_seed: int = 0
    valid_mode: str = "fixed"  # "fixed": one fixed crop per utterance; "full": whole utterances

    def __post_init__(self) -> None:
        _check(self, "valid_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)")
        _check(self, "split_seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        _check(self, "valid_mode", lambda v: v in VALID_MODES, f"one of {', '.join(VALID_MODES)}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def to_shown_dict(self) -> dict[str, dict[str, Any]]:
        """to_dict without the model keys that configure nothing here (a trial's run config as users read it);
        RunConfig.from_dict gives back the same config."""
        shown = self.to_dict()
        unused = self.model.unused_keys()
        shown["model"] = {k: v for k, v in shown["model"].items() if k not in unused}
        return shown

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]]) -> RunConfig:
        known_keys(cls, values, "run")
        return cls(
            model=ModelConfig.from_dict(values.get("model", {})),
            train=TrainConfig(**known_keys(TrainConfig, values.get("train", {}), "train")),
            data=DataConfig(**known_keys(DataConfig, values.get("data", {}), "data")),
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(obj: Any, key: str, ok: Any, what: str) -> None:
    value = getattr(obj, key)
    if not ok(value):
        section = "train" if isinstance(obj, TrainConfig) else "data"
        raise ConfigError(f"{section}.{key}={value!r} must be {what}")
