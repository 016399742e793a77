"""Train a unigram SentencePiece text tokenizer with the beit3.spm piece layout (<unk>=0, <s>=1, </s>=2) (see `beit3.cli.train_text_tokenizer_main`)."""
import sys

from beit3.cli.commands import train_text_tokenizer_main

if __name__ == "__main__":
    sys.exit(train_text_tokenizer_main())
