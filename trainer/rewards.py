"""Rule-based rewards (and an optional learned reward model), weighted and summed.

Every function maps (completion text, example) to a float. A function that raises, returns
something other than a finite real number, or runs past the timeout on one completion costs that
completion that reward (NaN: a failed reward, left out of its group's statistics by
group_advantages), is counted and logged; the run goes on.
"""
from __future__ import annotations

import ast
import functools
import logging
import math
import numbers
import queue
import threading
import re
import unicodedata
from collections import Counter

from trainer.tasks import addition_steps

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_STRICT = re.compile(r"^<think>((?:(?!<think>|</think>|<answer>|</answer>).)*)</think>"
                     r"<answer>((?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>$", re.DOTALL)
_LENIENT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


def extract_answer(text: str):
    """The content of the last complete <answer>...</answer>, stripped; None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _number(text: str):
    cleaned = text.replace(",", "").replace(" ", "")
    if not cleaned or len(cleaned) > 64:      # huge "numbers" are not worth parsing
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _safe_eval(expression: str, allowed_numbers):
    """Value of an expression of + - * / and parentheses over the given numbers, each used at most once
    (``allowed_numbers`` None: any integers)."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    tree = ast.parse(expression, mode="eval")
    used = []

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return left / right
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return node.value
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    value = walk(tree)
    if allowed_numbers is None:
        return value
    remaining = Counter(allowed_numbers)
    remaining.subtract(Counter(used))
    if any(count < 0 for count in remaining.values()):
        raise ValueError("numbers used that were not given (or more often than given)")
    return value


def accuracy(text: str, example: dict) -> float:
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    if example.get("task") == "countdown":
        try:
            value = _safe_eval(answer, example["numbers"])
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
            return 0.0
        return float(abs(value - float(example["answer"])) < 1e-9)
    try:
        from math_verify import parse, verify  # optional, better for free-form maths
        return float(verify(parse(example["answer"]), parse(answer)))
    except ImportError:
        pass
    got, want = _number(answer), _number(example["answer"])
    if got is not None and want is not None:
        return float(abs(got - want) <= 1e-6 * max(1.0, abs(want)))
    return float(answer == example["answer"].strip())


def format_strict(text: str, example: dict) -> float:
    """Exactly one <think>...</think> then one <answer>...</answer>, nothing around, nothing nested."""
    return float(_STRICT.match(text.strip()) is not None)


def format_lenient(text: str, example: dict) -> float:
    return float(_LENIENT.search(text) is not None)


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ADDITION = re.compile(r"^(\d+)\+(\d+)=$")


def reasoning_steps(text: str, example: dict) -> float:
    """Reasoning quality: the share of valid intermediate steps in the <think> block (its comma-separated
    steps; 0 without one). Addition (prompt "a+b="): step i must be column i of the worked column addition,
    ones first ("7+8=15", then "4+3+1=8" for 47 + 38), over max(expected, given) steps. Otherwise (countdown,
    the other operators, JSONL tasks): an equation "expression=value" is valid when the expression, of + - *
    / and parentheses over the task's numbers and the results of earlier valid steps (any integers where the
    task has no numbers), equals the value."""
    found = _THINK.search(text)
    steps = [s.strip() for s in found.group(1).split(",") if s.strip()] if found else []
    if not steps:
        return 0.0
    addition = _ADDITION.match(example.get("prompt", "").strip())
    if example.get("task") == "arithmetic" and addition:
        expected = addition_steps(int(addition.group(1)), int(addition.group(2)))
        return sum(got == want for got, want in zip(steps, expected)) / max(len(steps), len(expected))
    numbers = example.get("numbers")
    available = None if numbers is None else list(numbers)
    valid = 0
    for step in steps:
        left, sep, right = step.rpartition("=")
        target = _number(right)
        if not sep or target is None:
            continue
        try:
            ok = abs(_safe_eval(left, available) - target) < 1e-9
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
            ok = False
        valid += ok
        if ok and available is not None and target.is_integer():
            available.append(int(target))            # a step's result is a number the next steps may use
    return valid / len(steps)


def _script(ch: str):
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ")[0] if name else None


def language_consistency(text: str, example: dict) -> float:
    """Share of the reasoning's letters written in its dominant script (1.0 with no letters)."""
    match = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    reasoning = match.group(1) if match else text
    scripts = Counter(s for s in map(_script, reasoning) if s)
    total = sum(scripts.values())
    return 1.0 if total == 0 else scripts.most_common(1)[0][1] / total


def repetition(text: str, example: dict, n: int = 4) -> float:
    """Minus the share of repeated character n-grams outside the tags: 0 for none, towards -1 for loops."""
    text = re.sub(r"</?(think|answer)>", " ", text)
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


class RewardModel:
    """A sequence-classification checkpoint scoring prompt + completion (logit 0 of the head)."""

    def __init__(self, name: str, device="cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()

    def __call__(self, text: str, example: dict) -> float:
        import torch

        batch = self.tokenizer(example["prompt"] + text, return_tensors="pt", truncation=True)
        with torch.no_grad():
            return float(self.model(**{k: v.to(self.model.device) for k, v in batch.items()}).logits[0, 0])


BUILTIN = {"accuracy": accuracy, "format_strict": format_strict, "format_lenient": format_lenient,
           "steps": reasoning_steps, "language": language_consistency, "repetition": repetition}


def load_custom(entries) -> dict:
    """{import path: (function, weight)} from ``[[rewards.custom]]`` entries {"function": "module:name",
    "weight": w}; an entry that cannot be imported is an error naming it."""
    from trainer import registry

    loaded = {}
    for i, entry in enumerate(entries):
        path = entry["function"]
        fn = registry.load(f"rewards.custom[{i}].function", path, {})
        if not callable(fn):
            raise ValueError(f"rewards.custom[{i}].function = {path!r} is not callable")
        loaded[path] = (fn, float(entry["weight"]))
    return loaded


class RewardSet:
    """Named reward functions with weights; ``score`` returns a [B, R] list of floats (NaN on failure).

    Built-in functions take (completion text, example). Custom ones (``custom``: {name: (fn, weight)})
    have TRL's reward-function signature: one call per batch with keyword lists ``prompts``,
    ``completions`` and each task column (``answer``, ``task``, ...), returning a float or None per
    completion (None: not applicable, NaN without counting a failure). Every call runs on a daemon
    worker thread and is waited for at most ``timeout`` seconds: a call that hangs is abandoned with
    its thread (Python cannot stop one; being a daemon, it does not hold the process at exit) and
    later calls go to a fresh worker."""

    def __init__(self, weights: dict, reward_model=None, timeout: float = 10.0, custom: dict | None = None):
        self.functions = {name: fn for name, fn in BUILTIN.items() if weights.get(name, 0.0)}
        if weights.get("reward_model", 0.0) and reward_model is not None:
            self.functions["reward_model"] = reward_model
        custom = {name: (fn, weight) for name, (fn, weight) in (custom or {}).items() if weight}
        self.batch_functions = {name: fn for name, (fn, _) in custom.items()}
        if not self.functions and not self.batch_functions:
            raise ValueError("at least one reward needs a non-zero weight")
        self.weights = [float(weights[name]) for name in self.functions] + [weight for _, weight in custom.values()]
        self.failures = Counter()
        self.timeout = timeout
        self._jobs = self._start_worker()

    @property
    def names(self):
        return list(self.functions) + list(self.batch_functions)

    @staticmethod
    def _start_worker() -> queue.Queue:
        """A daemon thread that runs each job (a list of (fn, args)) and replies with every call's
        (ok, value) in turn, on the reply queue that came with the job."""
        jobs: queue.Queue = queue.Queue()

        def serve():
            while True:
                calls, reply = jobs.get()
                for fn, args in calls:
                    try:
                        reply.put((True, fn(*args)))
                    except Exception as err:  # noqa: BLE001 - reported to the caller
                        reply.put((False, err))

        threading.Thread(target=serve, daemon=True, name="reward-worker").start()
        return jobs

    def _checked(self, name, ok, value) -> float:
        """A call's result as a finite float, or NaN (counted and logged) when it failed."""
        if ok and not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value):
            return float(value)
        if ok:
            value = (ValueError(f"returned {value}") if isinstance(value, numbers.Real) and not isinstance(value, bool)
                     else TypeError(f"returned {type(value).__name__} {value!r}, not a real number"))
        self.failures[name] += 1
        log.warning("reward %s failed on a completion: %s: %s", name, type(value).__name__, value)
        return math.nan

    def _run(self, calls: list) -> list:
        """(ok, value) of each zero-argument call, run in order on the worker as one job; each result is
        waited for at most ``timeout`` seconds after the previous one, and after a timeout the
        remaining calls go to a fresh worker."""
        results = []
        while len(results) < len(calls):
            reply: queue.Queue = queue.Queue()
            self._jobs.put(([(fn, ()) for fn in calls[len(results):]], reply))
            while len(results) < len(calls):
                try:
                    results.append(reply.get(timeout=self.timeout))
                except queue.Empty:
                    self._jobs = self._start_worker()     # the hung call keeps the old worker
                    results.append((False, TimeoutError(f"no result within {self.timeout} s")))
                    break
        return results

    def _batch_values(self, name, ok, value, size) -> list:
        """A batch function's list of values, each checked; the whole batch fails together when the call
        failed or returned something other than a list of ``size``."""
        if ok and not (isinstance(value, (list, tuple)) and len(value) == size):
            ok, value = False, TypeError(f"returned {type(value).__name__}, not a list of {size} values")
        if not ok:
            return [self._checked(name, False, value)] + [math.nan] * (size - 1) if size else []
        return [math.nan if v is None else self._checked(name, True, v) for v in value]

    def score(self, texts, examples):
        calls = [functools.partial(fn, text, example) for text, example in zip(texts, examples)
                 for fn in self.functions.values()]
        columns = {key: [e.get(key) for e in examples] for key in examples[0] if key != "prompt"} if examples else {}
        prompts = [e["prompt"] for e in examples]
        calls += [functools.partial(fn, prompts=prompts, completions=list(texts), **columns)
                  for fn in self.batch_functions.values()]
        results = self._run(calls)
        width = len(self.functions)
        rows = [[self._checked(name, *results[i * width + k]) for k, name in enumerate(self.functions)]
                for i in range(len(texts))]
        for j, name in enumerate(self.batch_functions):
            for row, value in zip(rows, self._batch_values(name, *results[len(texts) * width + j], len(texts))):
                row.append(value)
        return rows
