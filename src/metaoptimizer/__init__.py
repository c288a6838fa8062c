"""metaoptimizer: learned optimizers for PyTorch."""

from metaoptimizer.config import MetaOptimizerConfig, OptimizerState

__version__ = "0.1.0"

__all__ = ["MetaOptimizerConfig", "OptimizerState", "__version__"]
