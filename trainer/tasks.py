"""Built-in verifiable tasks generated from a seed (train and held-out splits never overlap),
JSONL tasks, and the worked reasoning traces of the cold-start SFT stage.

An example is a dict: {"prompt": str, "answer": str, "trace": str (SFT completion) or None,
"task": name, "numbers": list (countdown)}.
"""
from __future__ import annotations

import json
import random

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"


def completion(reasoning: str, answer: str) -> str:
    return f"{THINK}{reasoning}{END_THINK}{ANSWER}{answer}{END_ANSWER}"


def _addition_trace(a: int, b: int) -> str:
    """Column addition, ones first: '7+8=15,4+3+1=8' for 47 + 38."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return ",".join(steps)


def arithmetic_example(rng: random.Random, digits: int, operators: str) -> dict:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(operators)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    reasoning = _addition_trace(a, b) if op == "+" else f"{a}{op}{b}={value}"
    return {"task": "arithmetic", "prompt": f"{a}{op}{b}=", "answer": str(value),
            "trace": completion(reasoning, str(value))}


def countdown_example(rng: random.Random, count: int) -> dict:
    """Numbers and a target reachable by combining them left to right with + - *."""
    numbers = [rng.randint(1, 12) for _ in range(count)]
    expression, value = str(numbers[0]), numbers[0]
    for n in numbers[1:]:
        op = rng.choice("+-*" if value * n < 200 else "+-")
        value = {"+": value + n, "-": value - n, "*": value * n}[op]
        expression = f"({expression}){op}{n}" if op == "*" and ("+" in expression or "-" in expression) \
            else f"{expression}{op}{n}"
    shuffled = numbers[:]
    rng.shuffle(shuffled)
    prompt = f"{','.join(map(str, shuffled))}:{value}="
    return {"task": "countdown", "prompt": prompt, "answer": str(value), "numbers": numbers,
            "trace": completion(f"{expression}={value}", expression)}


class TaskSource:
    """Deterministic examples: ``train(step, n)`` is a function of (seed, step) only, so a resumed run
    sees exactly the data the uninterrupted run would have; ``held_out()`` is disjoint from train."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._jsonl_train = self._jsonl_eval = None
        if cfg.task == "jsonl":
            self._jsonl_train = _read_jsonl(cfg.train_jsonl)
            self._jsonl_eval = _read_jsonl(cfg.eval_jsonl) if cfg.eval_jsonl else self._jsonl_train[-cfg.eval_size:]
            if not cfg.eval_jsonl:
                self._jsonl_train = self._jsonl_train[:-cfg.eval_size] or self._jsonl_train
        self._held_out = self._make_held_out()
        self._held_out_prompts = {e["prompt"] for e in self._held_out}

    def _example(self, rng):
        if self.cfg.task == "countdown":
            return countdown_example(rng, self.cfg.countdown_numbers)
        return arithmetic_example(rng, self.cfg.digits, self.cfg.operators)

    def _make_held_out(self):
        if self._jsonl_eval is not None:
            return self._jsonl_eval[: self.cfg.eval_size]
        rng = random.Random(f"{self.cfg.seed}-held-out")
        seen, out = set(), []
        for _ in range(self.cfg.eval_size * 20):
            e = self._example(rng)
            if e["prompt"] not in seen:
                seen.add(e["prompt"])
                out.append(e)
            if len(out) == self.cfg.eval_size:
                break
        return out

    def held_out(self):
        return list(self._held_out)

    def train(self, stream: str, step: int, n: int):
        if self._jsonl_train is not None:
            rng = random.Random(f"{self.cfg.seed}-{stream}-{step}")
            return [rng.choice(self._jsonl_train) for _ in range(n)]
        rng = random.Random(f"{self.cfg.seed}-{stream}-{step}")
        out = []
        while len(out) < n:
            e = self._example(rng)
            if e["prompt"] not in self._held_out_prompts:
                out.append(e)
        return out


def _read_jsonl(path: str):
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" not in record or ("answer" not in record and "completion" not in record):
                raise ValueError(f"{path}:{number}: each record needs 'prompt' and 'answer' (or 'completion')")
            records.append({"task": "jsonl", "prompt": record["prompt"], "answer": str(record.get("answer", "")),
                            "trace": record.get("completion")})
    if not records:
        raise ValueError(f"{path}: no records")
    return records
