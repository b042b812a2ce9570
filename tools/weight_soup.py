"""Average the generator weights of two training checkpoints (a weight "soup"): the second
checkpoint with its generator replaced by (1 - t) x first + t x second; how docs/model-card.md's
"soup" was made. Export the result with `tomocast export` like any checkpoint.

    PYTHONPATH=. python tools/weight_soup.py FIRST.pt SECOND.pt OUT.pt [--t 0.5]

The second checkpoint's normalisation (input scale, reference level) is kept.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("out")
    parser.add_argument("--t", type=float, default=0.5, help="weight of the second checkpoint")
    args = parser.parse_args()
    first = torch.load(args.first, weights_only=False, map_location="cpu")
    second = torch.load(args.second, weights_only=False, map_location="cpu")
    a, b = first["generator"], second["generator"]
    if a.keys() != b.keys():
        raise SystemExit("the checkpoints hold different networks")
    second["generator"] = {
        k: ((1 - args.t) * a[k].float() + args.t * b[k].float()).to(b[k].dtype)
        if b[k].is_floating_point()
        else b[k]
        for k in b
    }
    torch.save(second, args.out)
    print(f"{args.out}: {1 - args.t:g} x {args.first} + {args.t:g} x {args.second}")


if __name__ == "__main__":
    main()
