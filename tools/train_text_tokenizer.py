"""Train a unigram SentencePiece text tokenizer with the beit3.spm piece layout (<unk>=0, <s>=1, </s>=2)."""
import argparse

from beit3.text import train_text_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help="text files, one sentence or document per line")
    parser.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--character-coverage", type=float, default=1.0)
    args = parser.parse_args()
    path = train_text_tokenizer(args.input, args.out, args.vocab_size, args.character_coverage)
    print(path)


if __name__ == "__main__":
    main()
