"""Convert a public raw dataset release into a BEiT-3 data root (official JSONL index layouts)."""
import argparse
import json

from beit3.data.convert import CONVERTERS, convert_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="folder holding the raw release")
    parser.add_argument("--out", required=True, help="output data root")
    parser.add_argument("--tokenizer", help="SentencePiece model (beit3.spm); needed for all but imagenet")
    parser.add_argument("--min-answer-count", type=int, default=9, help="vqav2: answer vocabulary threshold")
    parser.add_argument("--rest-val-images", type=int, default=1000, help="vqav2: val images kept for validation")
    args = parser.parse_args()
    options = {"min_answer_count": args.min_answer_count, "rest_val_images": args.rest_val_images} \
        if args.dataset == "vqav2" else {}
    print(json.dumps(convert_dataset(args.dataset, args.src, args.out, args.tokenizer, **options), indent=1))


if __name__ == "__main__":
    main()
