"""Measure data-loading throughput and write it as JSON.

    python tools/benchmark_data.py --photos runs/webphotos --out benchmarks/results/data_cpu.json
        end to end (read -> decode -> two-view transform -> collated batch out of the DataLoader) for an image
        folder, a JSONL index and WebDataset shards at 1 and 2 workers, against torchvision's ImageNet loader,
        on web-size JPEGs made from the photographs scikit-image / scikit-learn ship (written to --photos once)
    python tools/benchmark_data.py --root runs/demo/data --out r.json
        one worker's decode + two-view transform on a data root's image source
"""
import argparse
import json

from beit3.bench.data_loading import benchmark_data_pipeline, measure_loading
from beit3.cli.commands import out_file, out_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--photos", type=out_folder, help="folder for (or holding) the web-size benchmark photographs")
    where.add_argument("--root", help="data root (e.g. the demo data): one-worker decode + transform only")
    parser.add_argument("--image-source", default="imagenet.train.index.jsonl", help="with --root")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers (with --photos)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per case, after one warm-up batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, interleaved (with --photos): the median")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tokenizer-image-size", type=int, default=224, help="with --root")
    parser.add_argument("--out", default=None, type=out_file, help="JSON file for the result")
    args = parser.parse_args()
    if args.photos:
        result = benchmark_data_pipeline(args.photos, tuple(args.workers), args.num_images, args.batch_size,
                                         args.batches, args.image_size, args.repeats, args.out)
    else:
        result = measure_loading(args.root, args.image_source, args.num_images, args.image_size,
                                 args.tokenizer_image_size, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
