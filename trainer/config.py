"""One dataclass tree for the whole run, loaded from TOML or YAML, every field overridable on the
command line as ``--section.field=value``. Unknown keys and values of the wrong type or range
raise ConfigError naming the key."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Optional

from r1kernels.advantages import ESTIMATORS, SCALES
from r1kernels.grpo import IS_LEVELS, LOSS_TYPES, check_options
from trainer import registry

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ConfigError(ValueError):
    pass


def _field(default, meaning: str):
    """A config field and its one-line meaning, which ``--help`` prints (one home for both)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": meaning})
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclasses.dataclass
class ModelConfig:
    name: str = _field("builtin-tiny", "the policy: builtin-tiny, builtin-0.5b or builtin-1.5b (Qwen2-shaped, random "
                       "init, no download) or a Hugging Face name or path")
    hidden_size: int = _field(128, "builtin-tiny: width of the residual stream")
    num_layers: int = _field(2, "builtin-tiny: decoder blocks")
    num_heads: int = _field(4, "builtin-tiny: query heads per attention layer")
    num_kv_heads: int = _field(2, "builtin-tiny: key/value heads (grouped-query attention)")
    intermediate_size: int = _field(256, "builtin-tiny: width of the MLP")
    vocab_size: int = _field(0, "builtin-tiny: pad its tokenizer with unused tokens to this many (a real lm_head, "
                             "e.g. 32768); 0 keeps its own 82 tokens")
    dtype: str = _field("float32", "dtype of the parameters and AdamW's state (compute: parallel.mixed_precision)")
    allow_bf16_params: bool = _field(False, "allow model.dtype = bfloat16 (AdamW updates below bf16's spacing are "
                                     "lost)")
    reference_model: bool = _field(False, "keep a frozen copy of the policy at the start of GRPO for the KL term "
                                   "(needed when grpo.beta > 0)")
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward (less memory, more time)")
    reward_model: str = _field("", "optional sequence-classification checkpoint scored as a reward "
                               "(weight: rewards.reward_model)")


@dataclasses.dataclass
class DataConfig:
    task: str = _field("arithmetic", "the task: arithmetic, countdown, jsonl or \"module:Class\" (your own)")
    train_jsonl: str = _field("", "task jsonl: training records {\"prompt\", \"answer\"}, one per line")
    eval_jsonl: str = _field("", "task jsonl: held-out records (never trained on)")
    sft_jsonl: str = _field("", "worked traces {\"prompt\", \"completion\"} for SFT; built-in tasks make their own")
    digits: int = _field(2, "arithmetic: digits per operand")
    operators: str = _field("+", "arithmetic: the operators to draw from, any of + - *")
    countdown_numbers: int = _field(3, "countdown: numbers to combine into the target")
    eval_size: int = _field(200, "held-out problems per evaluation")
    seed: int = _field(1234, "seed of the task's problem stream and held-out set")
    use_chat_template: bool = _field(True, "wrap prompts in the tokenizer's chat template when it has one")


@dataclasses.dataclass
class PretrainPhaseConfig:
    steps: int = _field(0, "next-token pretraining steps on the built-in task's web-like base corpus (noisy, "
                        "mixed layouts) before SFT: makes the built-in model a base model (0: none)")
    batch_size: int = _field(64, "documents per pretraining step")
    lr: float = _field(1e-3, "pretraining learning rate (AdamW)")


@dataclasses.dataclass
class SFTPhaseConfig:
    steps: int = _field(250, "cold-start SFT optimizer steps before GRPO (0 skips it, as R1-Zero does)")
    batch_size: int = _field(64, "SFT traces per step")
    lr: float = _field(1e-3, "SFT learning rate (AdamW)")


@dataclasses.dataclass
class GRPOPhaseConfig:
    steps: int = _field(150, "GRPO optimizer steps")
    # 128, not 32: with 32 prompts a step the updates' noise outweighs their signal for the first 60-80
    # steps and held-out accuracy falls below its start before it climbs (docs/trainer.md)
    prompts_per_step: int = _field(128, "prompts sampled per step")
    num_generations: int = _field(8, "completions per prompt (a group; at least 2)")
    lr: float = _field(1e-4, "GRPO peak learning rate (AdamW)")
    warmup_steps: int = _field(15, "steps of linear learning-rate warm-up from 0")
    lr_schedule: str = _field("cosine", "learning rate after the warm-up: cosine, linear (both to 0) or constant")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    max_grad_norm: float = _field(1.0, "clip the gradient's global L2 norm to this (0: no clipping)")
    num_iterations: int = _field(1, "optimizer passes over each step's rollouts (TRL's num_iterations)")
    is_cap: float = _field(2.0, "truncation of the sampler importance ratio (vLLM rollouts)")
    loss_type: str = _field("grpo", "the GRPO-family loss (TRL's names; docs/ops.md has the table)")
    beta: float = _field(0.0, "weight of the KL term against the reference model (0: none)")
    epsilon_low: Optional[float] = _field(None, "clipped types: lower clip range of the ratio (0.2 when not set)")
    epsilon_high: Optional[float] = _field(None, "clipped types: upper clip range (0.28 when not set: DAPO's "
                                           "clip-higher)")
    cispo_cap: Optional[float] = _field(None, "cispo: cap on the importance ratio (5.0 when not set)")
    importance_sampling_level: str = _field("token", "ratio per token or per sequence (GSPO)")
    scale_rewards: Optional[str] = _field(None, "advantage scale: group, batch or none (not set: group for grpo, "
                                          "none for rloo and dr_grpo)")
    advantage_estimator: str = _field("grpo", "group baseline: grpo (group mean), rloo (leave one out), dr_grpo")
    micro_batch_tokens: int = _field(4096, "tokens per packed micro-batch (memory per forward/backward)")
    packing: bool = _field(True, "pack micro-batches as varlen rows (false: padded batches)")
    kernels: str = _field("r1kernels", "r1kernels, or naive (materialised logits, for comparison)")
    max_bad_steps: int = _field(3, "updates in a row with a non-finite gradient norm before the run stops")


@dataclasses.dataclass
class RolloutConfig:
    engine: str = _field("hf", "rollout engine: hf (transformers' generate), vllm or \"module:Class\"")
    temperature: float = _field(0.5, "sampling temperature of the rollouts (evaluation decodes greedily)")
    top_p: float = _field(1.0, "nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = _field(32, "tokens per completion at most")
    eval_max_new_tokens: int = _field(32, "tokens per held-out completion at most")


@dataclasses.dataclass
class RewardConfig:
    accuracy: float = _field(1.0, "weight of correctness (1 for the right answer)")
    format_strict: float = _field(0.0, "weight of the exact <think>...</think><answer>...</answer> layout")
    format_lenient: float = _field(0.1, "weight of a <think> block then an <answer> block, anywhere in the text")
    steps: float = _field(0.2, "weight of reasoning quality: the share of valid intermediate steps in <think> "
                          "(addition's column steps, countdown's equations)")
    language: float = _field(0.0, "weight of language consistency (share of the reasoning's letters in its "
                            "dominant script)")
    repetition: float = _field(0.0, "weight of the repetition penalty (minus the share of repeated "
                              "character 4-grams)")
    reward_model: float = _field(0.0, "weight of model.reward_model's score")
    timeout_s: float = _field(10.0, "seconds per reward call; a call past it is a failed reward")
    # your own, TRL's reward-function signature: [[rewards.custom]] function = "module:name", weight = 0.5
    custom: list = _field([], "your reward functions ([[rewards.custom]] tables in a config file)")


@dataclasses.dataclass
class ParallelConfig:
    fsdp: str = _field("auto", "FSDP2 sharding: auto (when the world size is > 1), on or off")
    mixed_precision: str = _field("auto", "compute dtype: auto (bf16 compute and fp32 reduce on GPU, fp32 on CPU), "
                                  "bf16 or fp32")


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = _field("runs/default", "directory of the checkpoints, metrics.jsonl and the plot")
    every: int = _field(0, "GRPO steps between checkpoints (0: only at the end)")
    resume: bool = _field(False, "continue from the newest checkpoint in dir (none there: a fresh run)")
    resume_strict: bool = _field(False, "with resume: no checkpoint in dir is an error")
    allow_config_change: bool = _field(False, "resume with a changed config (the new values apply); else an error")
    export: bool = _field(True, "save_pretrained the final policy to <dir>/final")
    checkpointer: str = _field("dcp", "dcp (torch.distributed.checkpoint) or \"module:Class\"")


@dataclasses.dataclass
class LogConfig:
    plot: bool = _field(True, "write reward.png at the end (needs matplotlib)")
    progress: bool = _field(True, "show progress: an in-place bar in a terminal, else a line every progress_every "
                            "steps")
    progress_every: int = _field(10, "without a terminal: steps between progress lines (and one at each "
                                 "evaluation)")
    eval_every: int = _field(50, "GRPO steps between held-out evaluations (0: before and after only)")
    logger: str = _field("jsonl", "metrics sink beside the JSONL log: jsonl (only it), tensorboard, wandb or "
                         "\"module:Class\"")


@dataclasses.dataclass
class TrainerConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    pretrain: PretrainPhaseConfig = dataclasses.field(default_factory=PretrainPhaseConfig)
    sft: SFTPhaseConfig = dataclasses.field(default_factory=SFTPhaseConfig)
    grpo: GRPOPhaseConfig = dataclasses.field(default_factory=GRPOPhaseConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = _field(0, "seed of initialisation, sampling and data order")


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "data.task": tuple(registry.TASKS),
    "grpo.lr_schedule": ("cosine", "linear", "constant"),
    "grpo.loss_type": tuple(LOSS_TYPES),
    "grpo.importance_sampling_level": IS_LEVELS,
    "grpo.scale_rewards": SCALES,
    "grpo.advantage_estimator": ESTIMATORS,
    "grpo.kernels": ("r1kernels", "naive"),
    "rollout.engine": tuple(registry.ENGINES),
    "checkpoint.checkpointer": tuple(registry.CHECKPOINTERS),
    "log.logger": tuple(registry.LOGGERS),
    "parallel.fsdp": ("auto", "on", "off"),
    "parallel.mixed_precision": ("auto", "bf16", "fp32"),
}
OPTIONAL_CHOICES = {"grpo.scale_rewards"}     # None: the library's default for the estimator
IMPORT_PATHS = {"data.task", "rollout.engine", "checkpoint.checkpointer", "log.logger"}  # or "module:Name"
POSITIVE = {"pretrain.batch_size", "sft.batch_size", "grpo.steps", "grpo.prompts_per_step", "grpo.num_generations",
            "grpo.num_iterations", "grpo.micro_batch_tokens", "rollout.max_new_tokens", "rollout.eval_max_new_tokens",
            "data.digits", "data.eval_size", "model.hidden_size", "model.num_layers", "model.num_heads",
            "model.num_kv_heads", "rollout.temperature", "grpo.lr", "grpo.is_cap", "data.countdown_numbers",
            "rewards.timeout_s", "grpo.max_bad_steps", "log.progress_every"}
NON_NEGATIVE = {"model.vocab_size", "log.eval_every", "pretrain.steps", "pretrain.lr", "sft.steps", "sft.lr",
                "grpo.beta", "grpo.warmup_steps", "checkpoint.every", "grpo.max_grad_norm", "grpo.weight_decay",
                "grpo.cispo_cap"}


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, kind):
    if typing.get_origin(kind) is typing.Union:      # Optional[X]: an X when given
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is list:
        return _custom_rewards(key, value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _custom_rewards(key: str, value) -> list:
    """[[rewards.custom]] tables: {"function": "module:name", "weight": number}."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of tables ([[{key}]] in TOML), got {value!r}")
    entries = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"function", "weight"} or "function" not in entry:
            raise ConfigError(f"{where}: expected a table with 'function' (\"module:name\") and 'weight', "
                              f"got {entry!r}")
        function = entry["function"]
        if not isinstance(function, str) or not registry.is_import_path(function):
            raise ConfigError(f"{where}.function: expected \"module:name\", got {function!r}")
        weight = _coerce(f"{where}.weight", entry.get("weight", 1.0), float)
        if not math.isfinite(weight):
            raise ConfigError(f"{where}.weight: must be finite, got {weight}")
        entries.append({"function": function, "weight": weight})
    return entries


def _apply(obj, updates: dict, prefix: str = ""):
    fields = _fields(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; known: {', '.join(sorted(fields))}")
        kind = fields[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give it a table of fields")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, kind))


def validate(cfg: TrainerConfig) -> TrainerConfig:
    bad = list(_non_finite(cfg))
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be finite")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in IMPORT_PATHS and registry.is_import_path(value):
            continue
        if value not in allowed and not (value is None and key in OPTIONAL_CHOICES):
            raise ConfigError(f"{key}: expected one of {allowed}, got {value!r}")
    for key in POSITIVE | NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if key in POSITIVE and not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
        if key in NON_NEGATIVE and not value >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.grpo.num_generations < 2:
        raise ConfigError("grpo.num_generations: GRPO needs at least 2 completions per prompt")
    if cfg.model.dtype == "bfloat16" and not cfg.model.allow_bf16_params:
        raise ConfigError("model.dtype = 'bfloat16' stores the parameters in bf16: AdamW updates smaller than bf16's "
                          "spacing (most of them at lr 1e-6) are rounded away and training silently stalls. Keep "
                          "float32 parameters with parallel.mixed_precision = 'bf16' (bf16 compute), or set "
                          "model.allow_bf16_params = true if you mean it")
    if cfg.model.vocab_size and cfg.model.name != "builtin-tiny":
        raise ConfigError(f"model.vocab_size applies to builtin-tiny only (the vocabulary of {cfg.model.name!r} is "
                          "its tokenizer's); leave it 0")
    if cfg.grpo.beta > 0 and not cfg.model.reference_model:
        raise ConfigError("grpo.beta > 0 needs model.reference_model = true")
    if set(cfg.data.operators) - set("+-*") or not cfg.data.operators:
        raise ConfigError(f"data.operators: any of '+-*', got {cfg.data.operators!r}")
    if cfg.data.task == "jsonl" and not cfg.data.train_jsonl:
        raise ConfigError("data.task = 'jsonl' needs data.train_jsonl")
    _validate_loss(cfg)
    return cfg


def _non_finite(obj, prefix=""):
    """Keys of float fields that are NaN or infinite."""
    for name, kind in _fields(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(kind):
            yield from _non_finite(value, f"{prefix}{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            yield f"{prefix}{name}"


def _validate_loss(cfg: TrainerConfig) -> None:
    """The GRPO loss options, by the library's own rules, before any work starts."""
    from trainer.step import policy_loss_options

    g = cfg.grpo
    if g.loss_type == "cispo" and (g.epsilon_low is not None or g.epsilon_high is not None):
        raise ConfigError("grpo.epsilon_low / grpo.epsilon_high do not apply to loss_type 'cispo': its ratio cap "
                          "is grpo.cispo_cap")
    if g.loss_type != "cispo" and g.cispo_cap is not None:
        raise ConfigError(f"grpo.cispo_cap applies to loss_type 'cispo', not {g.loss_type!r}")
    options = policy_loss_options(g)
    if LOSS_TYPES[g.loss_type].needs_max_completion_length:
        options["max_completion_length"] = cfg.rollout.max_new_tokens
    try:
        check_options(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"grpo: {error}") from None


def load_file(path: str) -> dict:
    with open(path, "rb") as f:
        if path.endswith(".toml"):
            import tomllib
            return tomllib.load(f)
        if path.endswith((".yaml", ".yml")):
            import yaml
            return yaml.safe_load(f) or {}
    raise ConfigError(f"config file must be .toml or .yaml, got {path!r}")


def _type_name(kind) -> str:
    if typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind.__name__


def _meaning(key: str) -> str:
    """The one-line meaning a field's ``_field`` declares (``--help`` prints it)."""
    cls = TrainerConfig
    *sections, name = key.split(".")
    for part in sections:
        cls = _fields(cls)[part]
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _flat_fields(cls, prefix=""):
    for name, kind in _fields(cls).items():
        if dataclasses.is_dataclass(kind):
            yield from _flat_fields(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", kind


def parse_args(argv=None) -> TrainerConfig:
    defaults = TrainerConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="GRPO training (DeepSeek-R1 recipe) on r1kernels + FSDP2. "
        "Defaults: the embedded CPU run (cold-start SFT, then GRPO on built-in arithmetic).")
    parser.add_argument("--config", help=f"TOML or YAML file (presets in {CONFIG_DIR})")
    groups: dict = {}
    for key, kind in _flat_fields(TrainerConfig):
        if kind is list:
            continue                    # tables of a config file only
        group = groups.get(key.split(".")[0]) if "." in key else parser
        if group is None:
            group = groups[key.split(".")[0]] = parser.add_argument_group(f"[{key.split('.')[0]}]")
        section = defaults
        for part in key.split("."):
            section = getattr(section, part)
        choices = f"; one of {' | '.join(map(str, CHOICES[key]))}" if key in CHOICES else ""
        group.add_argument(f"--{key}", dest=key, default=None, metavar=_type_name(kind).upper(),
                           help=f"{_meaning(key)} (default: {section!r}{choices})")
    args = parser.parse_args(argv)
    cfg = TrainerConfig()
    if args.config:
        _apply(cfg, load_file(args.config))
    overrides: dict = {}
    for key, kind in _flat_fields(TrainerConfig):
        if kind is list:
            continue
        value = getattr(args, key)
        if value is not None:
            node = overrides
            *sections, name = key.split(".")
            for part in sections:
                node = node.setdefault(part, {})
            node[name] = value
    _apply(cfg, overrides)
    return validate(cfg)


def from_dict(updates: Optional[dict] = None) -> TrainerConfig:
    cfg = TrainerConfig()
    _apply(cfg, updates or {})
    return validate(cfg)
