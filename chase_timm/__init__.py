"""chase_timm: Chase (channel-aware dynamic sparse training) for every timm model."""
from . import metrics, slim
from .config import ChaseConfig
from .chase import Chase

__version__ = "0.1.0"
__all__ = ["Chase", "ChaseConfig", "metrics", "slim", "__version__"]
