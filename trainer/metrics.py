"""Metrics: a JSONL log, a progress line per step, and at the end a summary table and a PNG plot."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from r1kernels.hardware import proc_status_bytes


def peak_memory_bytes(device: torch.device) -> int:
    """The run's peak: CUDA's allocator high-water mark, or on CPU the process's resident one (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


class MetricsLog:
    """The built-in metrics logger (``log.logger = "jsonl"``): ``<checkpoint.dir>/metrics.jsonl``, a
    progress line, the summary and plot, written by the main rank. The trainer calls ``begin``, ``log``
    and ``summary`` and reads ``rows``; a logger of your own by import path is built as
    ``Class(config, world)`` (subclass this one and extend ``log`` to also send rows elsewhere)."""

    def __init__(self, cfg, world):
        self.enabled, self.progress = world.is_main, cfg.log.progress
        self.rows = []
        self.start = time.time()
        self.path = os.path.join(cfg.checkpoint.dir, "metrics.jsonl")

    def begin(self, resumed_at: tuple | None = None):
        """Start the file: empty for a new run; on a resume from checkpoint (phase, step), the rows
        logged before that point are kept (and shown in the summary) and the later ones dropped,
        since the resumed run logs those steps again."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if resumed_at is not None and os.path.exists(self.path):
            from trainer.checkpoint import run_order
            with open(self.path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [r for r in rows if run_order(r["phase"], r["step"]) < run_order(*resumed_at)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict, total: int):
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        row["elapsed_s"] = round(time.time() - self.start, 2)
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.progress:
            done = row["step"] + 1
            bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
            shown = " ".join(f"{k}={v:.3g}" for k, v in row.items()
                             if k in ("loss", "reward", "accuracy", "kl_mean", "entropy_mean", "clip_ratio_region",
                                      "completion_len", "train_tok_s", "eval_accuracy") and v is not None)
            print(f"[{bar}] {row['phase']} {done}/{total} {shown}", file=sys.stderr, flush=True)

    def summary(self, before: float, after: float, plot_path: str | None):
        grpo = [r for r in self.rows if r["phase"] == "grpo"]
        lines = ["", "== summary ==", f"{'held-out accuracy before GRPO':36s} {before * 100:6.1f}%",
                 f"{'held-out accuracy after GRPO':36s} {after * 100:6.1f}%",
                 f"{'change':36s} {(after - before) * 100:+6.1f} points"]
        if grpo:
            for key in ("reward", "accuracy", "kl_mean", "entropy_mean", "completion_len", "rollout_tok_s",
                        "train_tok_s", "peak_mem_mib"):
                values = [r[key] for r in grpo if r.get(key) is not None]
                if values:
                    lines.append(f"{'GRPO ' + key + ' (first -> last)':36s} {values[0]:.4g} -> {values[-1]:.4g}")
            failed = sum(r.get("reward_failures", 0) for r in grpo)
            skipped = sum(not math.isfinite(r["grad_norm"]) for r in grpo if r.get("grad_norm") is not None)
            lines.append(f"{'failed rewards, skipped updates':36s} {failed}, {skipped}")
        lines.append(f"{'wall time':36s} {time.time() - self.start:.0f} s")
        text = "\n".join(lines)
        print(text)
        if plot_path and grpo:
            self._plot(grpo, plot_path, before)
        return text

    def _plot(self, rows, path, before):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no plot)")
            return
        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r["reward"] for r in rows], label="reward (train batch)")
        ax.plot(steps, [r["accuracy"] for r in rows], label="accuracy (train batch)")
        evals = [(0, before)] + [(r["step"] + 1, r["eval_accuracy"]) for r in rows
                                 if r.get("eval_accuracy") is not None]
        if evals:
            ax.plot(*zip(*evals), "o-", label="held-out accuracy (greedy)")
        ax.set_xlabel("GRPO step")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"plot: {path}")
