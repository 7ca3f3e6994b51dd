"""``melanoma-synth ROOT``: write a synthetic set of lesion-like JPEGs (tests, benchmarks, the GPU check).

    melanoma-synth data/synthetic --n-train 600 --n-test 200 --size 128
    melanoma-synth data/synthetic-meta --metadata   # + manifest.csv: train with data=csv data.metadata=[...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from melanoma.synthetic import generate_dataset


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``melanoma-synth ROOT``: a synthetic set, e.g. a benchmark set of 10,605 images."""
    parser = argparse.ArgumentParser(prog="melanoma-synth", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("root", type=Path)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--metadata", action="store_true",
                        help="also write ROOT/manifest.csv with age_approx, sex and anatom_site that carry signal")
    args = parser.parse_args(argv)
    try:
        root = generate_dataset(args.root, args.n_train, args.n_test, args.size, args.seed,
                                workers=args.workers, metadata=args.metadata)
    except FileExistsError as exc:
        parser.exit(2, f"melanoma-synth: {exc}\n")
    print(root)


if __name__ == "__main__":
    main()
