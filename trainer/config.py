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


@dataclasses.dataclass
class ModelConfig:
    name: str = "builtin-tiny"          # builtin-tiny | builtin-0.5b | builtin-1.5b (Qwen2-shaped, random init) or HF
    hidden_size: int = 128              # builtin-tiny only
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 0                 # builtin-tiny only: its tokenizer padded with unused tokens to this size
    #                                     (a real lm_head, e.g. 32768); 0 keeps its own 82 tokens
    dtype: str = "float32"              # float32 | bfloat16: the parameters and AdamW's state (compute: parallel)
    allow_bf16_params: bool = False     # bf16 parameters with AdamW: updates below bf16's spacing are lost
    reference_model: bool = False       # load a frozen copy (needed when grpo.beta > 0)
    gradient_checkpointing: bool = False
    reward_model: str = ""              # optional sequence-classification checkpoint


@dataclasses.dataclass
class DataConfig:
    task: str = "arithmetic"            # arithmetic | countdown | jsonl | "module:Class" (trainer/registry.py)
    train_jsonl: str = ""               # {"prompt", "answer"} records (task = "jsonl")
    eval_jsonl: str = ""
    sft_jsonl: str = ""                 # {"prompt", "completion"} worked traces; built-in tasks make their own
    digits: int = 2                     # arithmetic: operand size
    operators: str = "+"                # arithmetic: any of + - *
    countdown_numbers: int = 3
    eval_size: int = 200
    seed: int = 1234
    use_chat_template: bool = True      # when the tokenizer has one


@dataclasses.dataclass
class SFTPhaseConfig:
    steps: int = 250                    # 0 skips the cold start (R1-Zero)
    batch_size: int = 64
    lr: float = 1e-3


@dataclasses.dataclass
class GRPOPhaseConfig:
    steps: int = 200
    prompts_per_step: int = 32
    num_generations: int = 8
    lr: float = 1e-4
    # long warm-up: a fresh Adam on noisy policy gradients otherwise knocks the SFT model back
    warmup_steps: int = 30
    lr_schedule: str = "cosine"         # cosine | linear | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_iterations: int = 1
    is_cap: float = 2.0                 # truncation of the sampler importance ratio (vLLM rollouts)
    loss_type: str = "grpo"
    beta: float = 0.0
    epsilon_low: Optional[float] = None   # clipped types: 0.2 when not set
    epsilon_high: Optional[float] = None  # clipped types: 0.28 when not set (DAPO's clip-higher)
    cispo_cap: Optional[float] = None     # cispo: the cap on the importance ratio, 5.0 when not set
    importance_sampling_level: str = "token"
    scale_rewards: Optional[str] = None   # group | batch | none; not set: group for grpo, none for rloo, dr_grpo
    advantage_estimator: str = "grpo"   # grpo | rloo | dr_grpo
    micro_batch_tokens: int = 4096      # token budget per packed micro-batch
    packing: bool = True                # packed varlen micro-batches (False: padded batches)
    kernels: str = "r1kernels"          # r1kernels | naive (materialised logits, for comparison)
    max_bad_steps: int = 3              # updates in a row with a non-finite gradient norm before the run stops


@dataclasses.dataclass
class RolloutConfig:
    engine: str = "hf"                  # hf | vllm | "module:Class" (trainer/registry.py)
    temperature: float = 0.5
    top_p: float = 1.0
    max_new_tokens: int = 32
    eval_max_new_tokens: int = 32


@dataclasses.dataclass
class RewardConfig:
    accuracy: float = 1.0
    format_strict: float = 0.0
    format_lenient: float = 0.1
    language: float = 0.0
    repetition: float = 0.0
    reward_model: float = 0.0
    timeout_s: float = 10.0             # per reward call; a call past it is a failed reward (NaN)
    # your own, TRL's reward-function signature: [[rewards.custom]] function = "module:name", weight = 0.5
    custom: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParallelConfig:
    fsdp: str = "auto"                  # auto (when world size > 1) | on | off
    mixed_precision: str = "auto"       # auto (bf16 compute + fp32 reduce on GPU, fp32 on CPU) | bf16 | fp32


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    every: int = 0                      # steps between checkpoints (0: only at the end)
    resume: bool = False                # continue from the newest checkpoint in dir; none there: a fresh run
    resume_strict: bool = False         # with resume: no checkpoint in dir is an error instead
    allow_config_change: bool = False   # resume with a changed config (the new values apply); else an error
    export: bool = True                 # save_pretrained of the final policy
    checkpointer: str = "dcp"           # dcp | "module:Class" (trainer/registry.py)


@dataclasses.dataclass
class LogConfig:
    plot: bool = True
    progress: bool = True
    eval_every: int = 50                # GRPO steps between held-out evaluations (0: before and after only)
    logger: str = "jsonl"               # jsonl | "module:Class" (trainer/registry.py)


@dataclasses.dataclass
class TrainerConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: SFTPhaseConfig = dataclasses.field(default_factory=SFTPhaseConfig)
    grpo: GRPOPhaseConfig = dataclasses.field(default_factory=GRPOPhaseConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = 0


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
POSITIVE = {"sft.batch_size", "grpo.steps", "grpo.prompts_per_step", "grpo.num_generations", "grpo.num_iterations",
            "grpo.micro_batch_tokens", "rollout.max_new_tokens", "rollout.eval_max_new_tokens", "data.digits",
            "data.eval_size", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
            "rollout.temperature", "grpo.lr", "grpo.is_cap", "data.countdown_numbers", "rewards.timeout_s",
            "grpo.max_bad_steps"}
NON_NEGATIVE = {"model.vocab_size", "log.eval_every", "sft.steps", "grpo.beta", "grpo.warmup_steps", "checkpoint.every",
                "grpo.max_grad_norm", "grpo.weight_decay", "sft.lr", "grpo.cispo_cap"}


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
    for key, kind in _flat_fields(TrainerConfig):
        if kind is list:
            continue                    # tables of a config file only
        section = defaults
        for part in key.split("."):
            section = getattr(section, part)
        parser.add_argument(f"--{key}", dest=key, default=None, metavar=_type_name(kind).upper(),
                            help=f"(default: {section!r})")
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
