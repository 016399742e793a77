"""VQ-KD visual tokenizer (BEiT v2): training objective, codebook, teachers and inference."""
