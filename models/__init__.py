"""nn.Modules only: encoders, pooling, heads, losses, and build_model(config)."""
from models import components, conformer, margins, pooling  # noqa: F401 - register the components (Conformer, poolings, margins)
from models.classifier import SpeakerClassifier, build_model, count_parameters, padding_mask
from models.config import ModelConfig
from models.registry import ACTIVATIONS, CLASSIFIERS, ENCODERS, HEADS, LOSSES, POOLINGS, ConfigError, Registry

__all__ = [
    "ACTIVATIONS", "CLASSIFIERS", "ENCODERS", "HEADS", "LOSSES", "POOLINGS", "ConfigError", "ModelConfig", "Registry",
    "SpeakerClassifier", "build_model", "count_parameters", "padding_mask",
]
