"""The Sophia optimizers."""

from sophia.optim.compat import convert_authors_state_dict
from sophia.optim.sophia_g import SophiaG
from sophia.optim.sophia_h import SophiaH

__all__ = ["SophiaG", "SophiaH", "convert_authors_state_dict"]
