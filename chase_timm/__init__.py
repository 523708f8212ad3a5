"""chase_timm: Chase (channel-aware dynamic sparse training) for every timm model."""
from .config import ChaseConfig

__version__ = "0.1.0"
__all__ = ["ChaseConfig", "__version__"]
