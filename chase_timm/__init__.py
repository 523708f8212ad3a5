"""chase_timm: Chase (channel-aware dynamic sparse training) for every timm model."""
from . import analysis, latency, metrics, slim, training
from .config import ChaseConfig
from .chase import Chase
from .fold import fold_batchnorm
from .hub import create_model, push_to_hub, save_pretrained  # importing registers timm's `chase_slim`

__version__ = "0.1.0"
__all__ = ["Chase", "ChaseConfig", "analysis", "create_model", "fold_batchnorm", "latency", "metrics", "push_to_hub", "save_pretrained", "slim", "training", "__version__"]
