"""sophia-lab: the Sophia second-order optimizer for PyTorch, its Hessian estimators, and tools
to measure it against AdamW.

>>> from sophia import SophiaG, SophiaH
"""

from sophia import hessian
from sophia.hessian import (
    SampledLoss,
    bernoulli_sampled_loss,
    categorical_sampled_loss,
    gaussian_sampled_loss,
    gnb_refresh,
    hutchinson,
)
from sophia.optim import SophiaG, SophiaH, convert_authors_state_dict

__version__ = "0.1.0"

__all__ = [
    "SampledLoss",
    "SophiaG",
    "SophiaH",
    "__version__",
    "bernoulli_sampled_loss",
    "categorical_sampled_loss",
    "convert_authors_state_dict",
    "gaussian_sampled_loss",
    "gnb_refresh",
    "hessian",
    "hutchinson",
]
