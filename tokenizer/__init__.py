"""VQ-KD visual tokenizer (BEiT v2): model, codebook, teachers, training objective, checkpoints and inference."""
from tokenizer.checkpoint import CheckpointLayoutError, infer_vqkd_config, load_tokenizer, resize_tokenizer, save_tokenizer
from tokenizer.precomputed import load_precomputed_codes
from tokenizer.quantizer import NormEMAQuantizer
from tokenizer.teachers import TeacherConfig, TeacherWeightsError, build_teacher
from tokenizer.vqkd import NAMED_CONFIGS, VQKD, VQKDConfig, vqkd_config

__all__ = [
    "CheckpointLayoutError", "NAMED_CONFIGS", "NormEMAQuantizer", "TeacherConfig", "TeacherWeightsError", "VQKD",
    "VQKDConfig", "build_teacher", "infer_vqkd_config", "load_precomputed_codes", "load_tokenizer", "resize_tokenizer", "save_tokenizer",
    "vqkd_config",
]
