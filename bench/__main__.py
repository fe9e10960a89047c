"""``python -m bench [logprobs ...] [--device cpu|cuda]``: run benchmarks (all by default)."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ["logprobs", "linear", "grpo", "advantages", "attention", "train", "verl"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # no argparse choices: with nargs="*" Python 3.11 checks the empty default against them and fails
    parser.add_argument("names", nargs="*", metavar="name", help=f"any of {', '.join(BENCHMARKS)}, or all")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true",
                        help="skip compile-heavy peers (torch.compile, FlexAttention) and time fewer repeats")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS) - {"all"})
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)}, all)")
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = BENCHMARKS if not args.names or "all" in args.names else args.names
    for name in names:
        importlib.import_module(f"bench.{name}").run(device, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
