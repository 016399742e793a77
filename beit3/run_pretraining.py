"""Compatibility alias of :mod:`beit3.cli.pretrain` (moved there in 0.1.0; this alias goes in the next release)."""
import sys
import warnings

from beit3.cli import pretrain as _moved

warnings.warn("beit3.run_pretraining moved to beit3.cli.pretrain", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
