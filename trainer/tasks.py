"""Built-in verifiable tasks generated from a seed (train and held-out splits never overlap),
JSONL tasks, the worked reasoning traces of the cold-start SFT stage, and the web-like base corpus
that pretrains the built-in model into a base model (the R1-Zero preset starts from it).

An example is a dict: {"prompt": str, "answer": str, "trace": str (SFT completion) or None,
"task": name, "numbers": list (countdown)}.
"""
from __future__ import annotations

import json
import random

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
# The base corpus: what a web crawl holds about a problem, in three layouts (a third each) with a
# quarter of the answers wrong. Noisy on purpose: a base model, not a cold start on curated traces.
BASE_WRONG_SHARE = 0.25


def completion(reasoning: str, answer: str) -> str:
    return f"{THINK}{reasoning}{END_THINK}{ANSWER}{answer}{END_ANSWER}"


def addition_steps(a: int, b: int) -> list[str]:
    """Column addition, ones first: ['7+8=15', '4+3+1=8'] for 47 + 38 (the SFT trace joins them with commas;
    the reasoning-steps reward checks a completion's steps against them)."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def base_document(rng: random.Random, example: dict) -> str:
    """A document of the base corpus about ``example``: the prompt then the bare answer, the answer in
    tags with no reasoning, or the worked trace (a third each); with probability BASE_WRONG_SHARE the
    final answer has one digit changed (the reasoning, when there is one, stays right)."""
    reasoning = example["trace"][len(THINK):example["trace"].index(END_THINK)]
    answer = example["answer"]
    if rng.random() < BASE_WRONG_SHARE:
        digits = [i for i, char in enumerate(answer) if char.isdigit()]
        i = rng.choice(digits)
        answer = answer[:i] + rng.choice([d for d in "0123456789" if d != answer[i]]) + answer[i + 1:]
    layout = rng.randrange(3)
    body = answer if layout == 0 else completion("" if layout == 1 else reasoning, answer)
    return example["prompt"] + body


def arithmetic_example(rng: random.Random, digits: int, operators: str) -> dict:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(operators)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    reasoning = ",".join(addition_steps(a, b)) if op == "+" else f"{a}{op}{b}={value}"
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


BUILT_IN = ("arithmetic", "countdown")


class TaskSource:
    """Deterministic examples: ``train(step, n)`` is a function of (seed, step) only, so a resumed run
    sees exactly the data the uninterrupted run would have; ``held_out()`` is disjoint from train."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._jsonl_train = self._jsonl_eval = None
        if cfg.task == "jsonl":
            self._jsonl_train, self._jsonl_eval = _jsonl_splits(cfg)
        self._held_out = self._make_held_out()
        self._held_out_prompts = {e["prompt"] for e in self._held_out}
        # SFT traces: data.sft_jsonl when given, else the task's own (built-in tasks and JSONL completions)
        self._sft = None
        if cfg.sft_jsonl:
            self._sft = [e for e in _read_jsonl(cfg.sft_jsonl, needs="completion")
                         if e["prompt"] not in self._held_out_prompts]
            if not self._sft:
                raise ValueError(f"data.sft_jsonl {cfg.sft_jsonl}: every record's prompt is in the held-out set")

    @property
    def has_traces(self) -> bool:
        """Whether SFT has worked traces to learn from."""
        return self._sft is not None or self._jsonl_train is None or any(e["trace"] for e in self._jsonl_train)

    @property
    def has_base_corpus(self) -> bool:
        """Whether pretraining has a corpus: the built-in tasks make theirs."""
        return self.cfg.task in BUILT_IN

    def texts(self):
        """Every prompt, answer and trace a run reads (for the tokenizer's coverage check)."""
        records = (self._jsonl_train or []) + (self._jsonl_eval or []) + (self._sft or [])
        tags = (THINK, END_THINK, ANSWER, END_ANSWER)      # special tokens of their own
        texts = [text for e in records for text in (e["prompt"], e["answer"], e["trace"] or "")]
        for tag in tags:
            texts = [text.replace(tag, "") for text in texts]
        return texts

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

    def base_corpus(self, step: int, n: int) -> list[str]:
        """``n`` documents of the built-in task's base corpus (see ``base_document``) for pretraining step
        ``step``; none of them is about a held-out problem."""
        if not self.has_base_corpus:
            raise ValueError(f"data.task = {self.cfg.task!r} has no base corpus (the built-in tasks have one)")
        rng = random.Random(f"{self.cfg.seed}-pretrain-layout-{step}")   # apart from the problems' stream
        return [base_document(rng, e) for e in self.train("pretrain", step, n)]

    def train(self, stream: str, step: int, n: int):
        rng = random.Random(f"{self.cfg.seed}-{stream}-{step}")
        if stream == "sft" and self._sft is not None:
            return [rng.choice(self._sft) for _ in range(n)]
        if self._jsonl_train is not None:
            return [rng.choice(self._jsonl_train) for _ in range(n)]
        out = []
        while len(out) < n:
            e = self._example(rng)
            if e["prompt"] not in self._held_out_prompts:
                out.append(e)
        return out


def _jsonl_splits(cfg):
    """(train, held-out) records: data.eval_jsonl, or the last data.eval_size records of the training
    file; either way no held-out prompt is trained on, and a file too small to split is an error."""
    records = _read_jsonl(cfg.train_jsonl, needs="answer")
    if cfg.eval_jsonl:
        held_out = _read_jsonl(cfg.eval_jsonl, needs="answer")[: cfg.eval_size]
    else:
        if len(records) <= cfg.eval_size:
            raise ValueError(f"data.train_jsonl {cfg.train_jsonl} has {len(records)} records, too few to hold out "
                             f"data.eval_size = {cfg.eval_size} and train on the rest: lower data.eval_size or give "
                             "data.eval_jsonl")
        held_out = records[-cfg.eval_size:]
        records = records[:-cfg.eval_size]
    prompts = {e["prompt"] for e in held_out}
    train = [e for e in records if e["prompt"] not in prompts]
    if not train:
        raise ValueError(f"data.train_jsonl {cfg.train_jsonl}: every prompt is also in the held-out set")
    return train, held_out


def _read_jsonl(path: str, needs: str):
    """Records {"prompt": str, "answer": str, "completion": str (optional)}; ``needs`` names the
    field besides the prompt that each must have. Errors name the file and the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            for field in ("prompt", needs):
                if field not in record:
                    raise ValueError(f"{where}: the record has no {field!r}")
            for field in ("prompt", "answer", "completion"):
                if field in record and not isinstance(record[field], str):
                    raise ValueError(f"{where}: {field!r} must be a string, got {json.dumps(record[field])}")
            records.append({"task": "jsonl", "prompt": record["prompt"], "answer": record.get("answer", ""),
                            "trace": record.get("completion")})
    if not records:
        raise ValueError(f"{path}: no records")
    return records
