"""Charts of a benchmark's JSON (``bench/common.save``'s payload): median time and peak memory per
shape, one line per implementation (ours per backend and every peer that ran), titled with the
machine, dtype and commit of the run. ``python -m bench`` writes ``<name>-<device>.png`` beside each
JSON; ``bench/gpu_check.sh`` writes the same from its JSON. ``python -m bench.charts FILE.json ...``
redraws them from saved results.
"""
from __future__ import annotations

import json
import os
import re
import sys

# Shapes are ordered by the number after "V=" (the vocabulary), then as they were measured.
_VOCAB = re.compile(r"V=(\d+)")


def _axis_labels(shapes: list[str]) -> list[str]:
    """Each shape without the sizes (``key=value``) and dtype every shape shares: the x axis says what
    varies."""
    words = [re.split(r"[ ,]+", s) for s in shapes]
    shared = set.intersection(*(set(w) for w in words)) if len(words) > 1 else set()
    drop = {w for w in shared if "=" in w or w in ("float32", "float64", "bfloat16", "float16")}
    return [" ".join(x for x in w if x not in drop).replace(" ", "\n", 1) or s for w, s in zip(words, shapes)]


def _order(shape: str) -> int:
    found = _VOCAB.search(shape)
    return int(found.group(1)) if found else 0


def write_chart(payload: dict, path: str) -> str | None:
    """Time (ms, log scale) and peak memory (MiB) against shape for every implementation with a
    time; None (and no file) when matplotlib is missing or nothing was timed."""
    rows = [r for r in payload["rows"] if r.get("seconds")]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return None
    shapes = sorted(dict.fromkeys(r["shape"] for r in rows), key=_order)
    labels = _axis_labels(shapes)
    names = list(dict.fromkeys(f"{r['name']} {r.get('phase', '')}".strip() for r in rows))
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        mine = {r["shape"]: r for r in rows if f"{r['name']} {r.get('phase', '')}".strip() == name}
        xs = [i for i, s in enumerate(shapes) if s in mine]
        style = dict(marker="o", linewidth=2.2 if name.startswith("ours") else 1.2,
                     linestyle="-" if name.startswith("ours") else "--", label=name)
        time_ax.plot(xs, [mine[shapes[i]]["seconds"] * 1e3 for i in xs], **style)
        peaks = [(i, mine[shapes[i]]["peak_bytes"]) for i in xs if mine[shapes[i]].get("peak_bytes") is not None]
        memory_ax.plot([i for i, _ in peaks], [b / 2**20 for _, b in peaks], **style)
    for ax, what in ((time_ax, "median time (ms, log)"), (memory_ax, "peak memory (MiB)")):
        ax.set_xticks(range(len(shapes)), labels, fontsize=8)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    time_ax.set_yscale("log")
    memory_ax.set_ylim(bottom=0)
    handles, names = time_ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    dtype = payload.get("ceilings", {}).get("dtype", "")
    fig.suptitle(f"{payload['benchmark']}: {payload['device']}, {dtype}, commit {payload['commit']}"
                 f"{' (--quick)' if payload.get('quick') else ''}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(names) - 1) // 2), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    for json_path in argv:
        with open(json_path) as f:
            payload = json.load(f)
        written = write_chart(payload, os.path.splitext(json_path)[0] + ".png")
        print("wrote", written or f"nothing for {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
