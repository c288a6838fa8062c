"""metaoptimizer: learned optimizers for PyTorch.

The spec's API: :class:`MetaOptimizer` over a :class:`MetaOptimizerConfig`, with rule state in
:class:`OptimizerState`; :class:`~metaoptimizer.optim.LearnedOptimizer` is the ``torch.optim`` adapter;
:mod:`metaoptimizer.pretrained` holds the shipped, meta-trained optimizers.
"""

from metaoptimizer import pretrained
from metaoptimizer.config import MetaOptimizerConfig, MetaOptTrainResult, OptimizerState
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.optim import LearnedOptimizer

__version__ = "0.1.0"

__all__ = [
    "LearnedOptimizer",
    "MetaOptimizer",
    "MetaOptimizerConfig",
    "MetaOptTrainResult",
    "OptimizerState",
    "__version__",
    "pretrained",
]
