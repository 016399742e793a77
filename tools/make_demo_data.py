"""Generate the procedural demo data root (images, BEiT-3 index files, corpus, beit3.spm, WebDataset shards)."""
import argparse
import json
import time

from beit3.data.demo import make_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output data root")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = make_demo_data(args.out, args.num_images, args.image_size, args.seed, num_shards=args.num_shards)
    print(json.dumps(manifest["index_lines"], indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
