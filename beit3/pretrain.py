"""Compatibility alias (0.1.0; goes in the next release): the objective moved to :mod:`beit3.masked_data_modeling`,
:class:`PretrainInputs` to :mod:`beit3.masking`, :func:`visual_codes_fn` to :mod:`beit3.data.codes`."""
import warnings

from beit3.data.codes import visual_codes_fn
from beit3.data.pretrain import STREAMS
from beit3.masked_data_modeling import STAGE_STREAMS, MaskedDataModeling, ObjectiveConfig, Stage, apply_stage
from beit3.masking import PretrainInputs

warnings.warn("beit3.pretrain moved to beit3.masked_data_modeling, beit3.masking and beit3.data.codes",
              DeprecationWarning, stacklevel=2)
__all__ = ["STAGE_STREAMS", "STREAMS", "MaskedDataModeling", "ObjectiveConfig", "PretrainInputs", "Stage",
           "apply_stage", "visual_codes_fn"]
