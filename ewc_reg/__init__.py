"""ewc_reg: Elastic Weight Consolidation with every Fisher estimator, exact by default.

Public API::

    from ewc_reg import EWCRegularizer, fisher_diagonal
"""

from .fisher import METHODS, fisher_diagonal
from .likelihoods import LIKELIHOODS
from .regularizer import MODES, EWCRegularizer

__version__ = "0.1.0"

__all__ = ["LIKELIHOODS", "METHODS", "MODES", "EWCRegularizer", "__version__", "fisher_diagonal"]
