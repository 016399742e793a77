"""Measure data-loading throughput (decode + two-view transform, images/s per worker) and write it as JSON."""
import argparse
import json

from beit3.bench.data_loading import measure_loading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="data root (e.g. the demo data)")
    parser.add_argument("--image-source", default="imagenet.train.index.jsonl")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tokenizer-image-size", type=int, default=224)
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args()
    result = measure_loading(args.root, args.image_source, args.num_images, args.image_size,
                             args.tokenizer_image_size, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
