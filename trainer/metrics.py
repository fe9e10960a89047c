"""Metrics: a JSONL log (always), optionally TensorBoard or Weights & Biases beside it, progress (an in-place
bar in a terminal, a line every few steps in a log file), and at the end a summary table and a PNG plot."""
from __future__ import annotations

import dataclasses
import importlib
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

    SHOWN = ("loss", "reward", "accuracy", "kl_mean", "entropy_mean", "clip_ratio_region", "completion_len",
             "train_tok_s", "eval_accuracy")      # the progress display's metrics

    def __init__(self, cfg, world):
        self.enabled, self.progress = world.is_main, cfg.log.progress
        self.progress_every = cfg.log.progress_every
        self.rows = []
        self.start = time.time()
        self.path = os.path.join(cfg.checkpoint.dir, "metrics.jsonl")
        self.bar = None                              # tqdm's, in a terminal

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
            self._show(row, total)

    def _show(self, row: dict, total: int):
        """In a terminal (stderr a TTY), tqdm's bar redrawn in place with the key metrics; otherwise (a log
        file, CI) a line every ``log.progress_every`` steps, at each evaluation and at each phase's end."""
        done = row["step"] + 1
        shown = {k: f"{v:.3g}" for k, v in row.items() if k in self.SHOWN and v is not None}
        if sys.stderr.isatty():
            from tqdm import tqdm
            if self.bar is None or self.bar.desc != row["phase"]:
                self.close_bar()
                self.bar = tqdm(total=total, desc=row["phase"], initial=done - 1, file=sys.stderr, dynamic_ncols=True)
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            if done == total:
                self.close_bar()
        elif done % self.progress_every == 0 or done == total or row.get("eval_accuracy") is not None:
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"{row['phase']} {done}/{total} ({row['elapsed_s']:.0f} s) {text}", file=sys.stderr, flush=True)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, before: float, after: float, plot_path: str | None):
        self.close_bar()
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


class _SinkLog(MetricsLog):
    """The JSONL log and, on the main rank, an external sink: ``open_sink`` makes it, ``write`` gets each
    row's finite numbers, ``finish`` the held-out accuracies before and after GRPO at the end."""

    def __init__(self, cfg, world):
        super().__init__(cfg, world)
        self.sink = self.open_sink(cfg) if self.enabled else None

    def log(self, row: dict, total: int):
        super().log(row, total)
        if self.sink is not None:
            row = self.rows[-1]
            self.write(row["phase"], row["step"], dict(_scalars(row)))

    def summary(self, before: float, after: float, plot_path: str | None):
        text = super().summary(before, after, plot_path)
        if self.sink is not None:
            self.finish({"eval/accuracy_before_grpo": before, "eval/accuracy_after_grpo": after})
        return text


def _optional(module: str, logger: str, install: str):
    """The optional package a logger needs, or an ImportError that names the install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"log.logger = {logger!r} needs {install}") from None


class TensorBoardLog(_SinkLog):
    """``log.logger = "tensorboard"``: the JSONL log, and every numeric metric as a TensorBoard scalar
    ``<phase>/<name>`` at its step, in ``<checkpoint.dir>/tensorboard`` (``tensorboard --logdir`` there).
    TensorBoard is an optional dependency (``pip install tensorboard``)."""

    def open_sink(self, cfg):
        tensorboard = _optional("torch.utils.tensorboard", "tensorboard", "TensorBoard: pip install tensorboard")
        return tensorboard.SummaryWriter(os.path.join(cfg.checkpoint.dir, "tensorboard"))

    def write(self, phase: str, step: int, values: dict):
        for name, value in values.items():
            self.sink.add_scalar(f"{phase}/{name}", value, step)

    def finish(self, final: dict):
        for name, value in final.items():
            self.sink.add_scalar(name, value, 0)
        self.sink.close()


class WandbLog(_SinkLog):
    """``log.logger = "wandb"``: the JSONL log, and every numeric metric to Weights & Biases (project
    ``r1kernels`` or ``$WANDB_PROJECT``, the run's config attached). Offline with no network:
    ``WANDB_MODE=offline`` (``wandb sync`` uploads later). wandb is an optional dependency
    (``pip install wandb``)."""

    def open_sink(self, cfg):
        wandb = _optional("wandb", "wandb", "Weights & Biases: pip install wandb (WANDB_MODE=offline to log "
                          "with no network)")
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "r1kernels"), dir=cfg.checkpoint.dir,
                          config=dataclasses.asdict(cfg))

    def write(self, phase: str, step: int, values: dict):
        self.sink.log({f"{phase}/{name}": value for name, value in values.items()})

    def finish(self, final: dict):
        self.sink.summary.update(final)
        self.sink.finish()


def _scalars(row: dict):
    """(name, value) of a row's finite numbers, the bookkeeping (phase, step) left out."""
    for name, value in row.items():
        if name not in ("phase", "step") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            yield name, float(value)
