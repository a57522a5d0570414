"""The plain, frozen description of a model: every field is a study-file key under [model]."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from models.registry import ACTIVATIONS, CLASSIFIERS, ENCODERS, HEADS, LOSSES, POOLINGS, ConfigError


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "transformer"  # or "conformer", or "none": no sequence model (pooling sees the frames)
    d_model: int = 80
    nhead: int = 2
    n_layers: int = 1
    ff_mult: float = 3.2  # feed-forward width = round(ff_mult * d_model); 3.2 gives the sample's 256
    dropout: float = 0.1
    pooling: str = "mean"
    head: str = "linear"  # "linear" or "mlp-H1[-H2...]" (hidden sizes)
    head_activation: str = "relu"
    head_dropout: float = 0.0
    loss: str = "ce"
    label_smoothing: float = 0.0
    # Conformer and front end (issue 3); `dropout` is the feed-forward/residual dropout of every encoder.
    subsample: bool = False  # two stride-2 convolutions before the encoder (T -> about T/4)
    prenet: bool = True  # a linear projection n_mels -> d_model first; false (encoder "none" only): raw features
    conv_kernel: int = 31  # Conformer depthwise convolution kernel size (odd)
    conv_expansion: int = 2  # Conformer pointwise expansion before the GLU
    attn_dropout: float = 0.1  # Conformer attention-weight dropout
    conv_dropout: float = 0.1  # Conformer convolution-module output dropout
    # Pooling, classifier and margin losses.
    pool_hidden: int = 128  # bottleneck of attentive statistics pooling
    classifier: str = "linear"  # "linear" (with bias) or "cosine" (L2-normalised, no bias; margin losses)
    scale: float = 30.0  # logits = scale * cosine for the cosine classifier
    margin: float = 0.2  # AM-Softmax (cos - m) / AAM-Softmax (cos(theta + m))
    margin_warmup_steps: int = 0  # margin grows linearly from 0 over these steps
    margin_warmup_fraction: float = 0.0  # ... or over this fraction of the run's steps (scales with the budget)

    def __post_init__(self) -> None:
        for key in ("encoder", "pooling", "head", "head_activation", "loss", "classifier"):
            _require(isinstance(getattr(self, key), str), key, getattr(self, key), "a string")
        for key in ("d_model", "nhead", "n_layers", "conv_expansion", "pool_hidden"):
            value = getattr(self, key)
            positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            _require(positive, key, value, "a positive integer")
        if self.d_model % self.nhead:
            divisors = [n for n in range(1, self.d_model + 1) if self.d_model % n == 0]
            raise ConfigError(
                f"model.nhead={self.nhead} must divide model.d_model={self.d_model}; "
                f"valid nhead: {', '.join(map(str, divisors))}"
            )
        _require(_is_number(self.ff_mult) and self.ff_mult > 0, "ff_mult", self.ff_mult, "a positive number")
        _require(isinstance(self.conv_kernel, int) and self.conv_kernel >= 1 and self.conv_kernel % 2 == 1,
                 "conv_kernel", self.conv_kernel, "a positive odd integer")
        _require(isinstance(self.subsample, bool), "subsample", self.subsample, "true or false")
        _require(isinstance(self.prenet, bool), "prenet", self.prenet, "true or false")
        if not self.prenet and self.encoder != "none":
            raise ConfigError(f"model.prenet=false needs model.encoder='none', not model.encoder={self.encoder!r} "
                              "(a sequence model works on d_model-wide frames)")
        _require(_is_number(self.scale) and self.scale > 0, "scale", self.scale, "a positive number")
        _require(_is_number(self.margin) and 0 <= self.margin < 1, "margin", self.margin, "a number in [0, 1)")
        _require(isinstance(self.margin_warmup_steps, int) and self.margin_warmup_steps >= 0,
                 "margin_warmup_steps", self.margin_warmup_steps, "an integer >= 0")
        _require(_is_number(self.margin_warmup_fraction) and 0 <= self.margin_warmup_fraction <= 1,
                 "margin_warmup_fraction", self.margin_warmup_fraction, "a number in [0, 1]")
        if self.margin_warmup_fraction and self.margin_warmup_steps:
            raise ConfigError("model.margin_warmup_steps and model.margin_warmup_fraction both set; give one "
                              "(a fraction scales with train.max_steps)")
        for key in ("dropout", "head_dropout", "label_smoothing", "attn_dropout", "conv_dropout"):
            value = getattr(self, key)
            _require(_is_number(value) and 0 <= value < 1, key, value, "a number in [0, 1)")
        ENCODERS.check(self.encoder, "model.encoder")
        POOLINGS.check(self.pooling, "model.pooling")
        HEADS.check(self.head_kind, "model.head")
        ACTIVATIONS.check(self.head_activation, "model.head_activation")
        LOSSES.check(self.loss, "model.loss")
        CLASSIFIERS.check(self.classifier, "model.classifier")
        for registry, key in ((ENCODERS, "encoder"), (POOLINGS, "pooling"), (LOSSES, "loss")):
            name = getattr(self, key)
            for other, needed in registry.requirements(name).items():
                actual = getattr(self, other)
                if actual != needed:
                    raise ConfigError(
                        f"model.{key}={name!r} needs model.{other}={needed!r}, not model.{other}={actual!r}"
                    )
        self.head_hidden  # noqa: B018 - parses the layout, raising on a malformed one

    @property
    def dim_feedforward(self) -> int:
        return max(1, round(self.ff_mult * self.d_model))

    @property
    def head_kind(self) -> str:
        return self.head.split("-", 1)[0]

    @property
    def head_hidden(self) -> tuple[int, ...]:
        """Hidden sizes of an "mlp-256-128" layout; () for "linear"."""
        parts = self.head.split("-")[1:]
        if not all(p.isdigit() and int(p) > 0 for p in parts) or (self.head_kind == "mlp") != bool(parts):
            raise ConfigError(
                f"model.head={self.head!r} is not a head layout; valid: 'linear' or 'mlp-H1[-H2...]' "
                "with positive hidden sizes, e.g. 'mlp-256'"
            )
        return tuple(int(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unused_keys(self) -> set[str]:
        """Keys that configure nothing in this model (a Transformer's conv_kernel, CE's margin), left out of what
        is shown so a run config lists only what shaped the model; from_dict fills them back with defaults."""
        unused = set()
        if self.encoder != "conformer":
            unused |= {"conv_kernel", "conv_expansion", "attn_dropout", "conv_dropout"}
        if self.encoder == "none":
            unused |= {"nhead", "n_layers", "ff_mult", "dropout"}
        if self.loss == "ce":
            unused |= {"margin", "margin_warmup_steps", "margin_warmup_fraction"}
        if self.classifier != "cosine":
            unused.add("scale")
        if self.pooling != "attentive_stats":
            unused.add("pool_hidden")
        if self.head == "linear":
            unused |= {"head_activation", "head_dropout"}
        return unused

    @classmethod
    def from_dict(cls, values: dict[str, Any], section: str = "model") -> ModelConfig:
        return cls(**known_keys(cls, values, section))


def known_keys(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """Refuse unknown keys with the list of valid ones (a typo must not be silently ignored)."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; valid keys: {', '.join(valid)}")
    return dict(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}={value!r} must be {what}")
