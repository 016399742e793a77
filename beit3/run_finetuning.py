"""Compatibility alias of :mod:`beit3.cli.finetune` (moved there in 0.1.0; this alias goes in the next release)."""
import sys
import warnings

from beit3.cli import finetune as _moved

warnings.warn("beit3.run_finetuning moved to beit3.cli.finetune", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
