"""beit3: BEiT-3 "Imglish" pretraining, visual tokenizer training, fine-tuning and evaluation."""
__version__ = "0.1.0"
