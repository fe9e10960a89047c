"""Write the parts of docs/ops.md that restate tables of the code, from the code.

Each generated part sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the text
around it is written by hand. Parts:

    two-pass-routes  r1kernels.grpo.TWO_PASS_ROUTES: when linear_grpo_loss does not compute the
                     gradients in its forward
    loss-types       r1kernels.grpo.LOSS_TYPES: each type's normaliser, options and capabilities
    op-backends      each op's backend table (r1kernels.backends.table): which op has which backend

Run: python scripts/generate_docs.py [--check]   (--check: exit 1, naming the files, where they differ;
tests/test_docs.py runs the check).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kernels import backends, grpo  # noqa: E402

FILES = (ROOT / "docs" / "ops.md",)
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def two_pass_routes() -> str:
    return "".join(f"- {text}\n" for text in grpo.TWO_PASS_ROUTES.values())


def loss_types() -> str:
    lines = ["| loss type | normaliser | clipped ratio | whole sequence | options | needs |",
             "|---|---|---|---|---|---|"]
    for name, entry in grpo.LOSS_TYPES.items():
        options = ", ".join(f"`{o}`" for o in entry.accepts) or "-"
        needs = ", ".join(f"`{o}`" for o in entry.needs) or "-"
        lines.append(f"| `{name}` | {entry.normaliser} | {'yes' if entry.clipped else 'no'} | "
                     f"{'yes' if entry.whole_sequence else 'no'} | {options} | {needs} |")
    return "\n".join(lines) + "\n"


def op_backends() -> str:
    names = [b for b in backends.all_names() if b != "auto"]
    lines = ["| op | " + " | ".join(f"`{b}`" for b in names) + " |", "|---|" + "---|" * len(names)]
    for op in backends.OPS:
        rows = backends.table(op)
        order = [b for b, row in rows.items() if row.auto]
        cells = [str(order.index(b) + 1) if b in order else "on request" if b in rows else "-" for b in names]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    swaps = "; ".join(f"`{op}` on `{b}` runs `{row.deterministic}`" for op in backends.OPS
                      for b, row in backends.table(op).items() if row.deterministic)
    return ("\n".join(lines) + "\n\nA number is the backend's place in `auto`'s order for the op; on request: "
            "only when named (`use_backend`, `R1K_BACKEND`); - : the op does not have it. "
            f"With `deterministic=True` (a row's `deterministic` field): {swaps}.\n")


PARTS = {"two-pass-routes": two_pass_routes, "loss-types": loss_types, "op-backends": op_backends}


def render(text: str) -> str:
    """``text`` with every generated part rewritten; an unknown part name raises."""
    def fill(match):
        name = match.group("name")
        if name not in PARTS:
            raise KeyError(f"unknown generated part {name!r} (known: {tuple(PARTS)})")
        return match.group(1) + PARTS[name]() + match.group(4)
    return _BLOCK.sub(fill, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"stale generated parts in {', '.join(stale)}: run python scripts/generate_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
