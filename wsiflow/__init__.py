"""wsiflow: bone-marrow aspirate slides to cell-level evidence for MDS.

Research use only: outputs support, never replace, a hematologist.

This module stays thin: importing :mod:`wsiflow` loads neither torch nor dask.
"""

from wsiflow._version import __version__
from wsiflow.errors import ConfigError, SlideError, WsiflowError

__all__ = ["ConfigError", "SlideError", "WsiflowError", "__version__"]
