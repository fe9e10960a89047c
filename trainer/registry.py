"""Swappable parts by name: a built-in, or your own by import path ("module:Name") in the config,
without editing trainer/.

    rollout.engine = "my_engines:Sglang"   # Engine(config, tokenizer, world).generate(model, prompts, G, ...)
    data.task = "my_tasks:Sudoku"          # Task(data_config).train(stream, step, n), .held_out()
    checkpoint.checkpointer = "my_ckpt:S3"  # see trainer.checkpoint.Checkpointer for its methods
    log.logger = "my_log:Wandb"            # see trainer.metrics.MetricsLog (subclass it to keep the JSONL file)
    [[rewards.custom]] function = "my_rewards:length_penalty"
"""
from __future__ import annotations

import importlib


def is_import_path(name: str) -> bool:
    """"module:Name": one colon, both sides non-empty."""
    return name.count(":") == 1 and all(name.split(":"))


def load(key: str, name: str, builtins: dict):
    """builtins[name], or the object at the import path ``name``; an error names the config key."""
    if name in builtins:
        return builtins[name]
    if not is_import_path(name):
        raise ValueError(f"{key} = {name!r}: expected one of {sorted(builtins)} or an import path \"module:Name\"")
    module, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key} = {name!r} cannot be loaded: {err}") from None


# the built-ins (factories, imported when used): engines get (config, tokenizer, world), tasks the data
# section, checkpointers (checkpoint section, world), loggers (config, world)
def _hf_engine(cfg, tokenizer, world):
    from trainer.rollout import HFGenerateEngine
    return HFGenerateEngine(tokenizer, cfg.rollout, world)


def _vllm_engine(cfg, tokenizer, world):
    from trainer.model import BUILTIN_MODELS
    from trainer.rollout import VLLMEngine, builtin_model_dir
    if cfg.model.name in BUILTIN_MODELS:
        return VLLMEngine(builtin_model_dir(cfg, tokenizer, world), tokenizer, cfg.rollout, world, load_format="dummy")
    return VLLMEngine(cfg.model.name, tokenizer, cfg.rollout, world)


def _builtin_task(data_cfg):
    from trainer.tasks import TaskSource
    return TaskSource(data_cfg)


def _dcp_checkpointer(checkpoint_cfg, world):
    from trainer.checkpoint import Checkpointer
    return Checkpointer(checkpoint_cfg, world)


def _jsonl_logger(cfg, world):
    from trainer.metrics import MetricsLog
    return MetricsLog(cfg, world)


def _tensorboard_logger(cfg, world):
    from trainer.metrics import TensorBoardLog
    return TensorBoardLog(cfg, world)


def _wandb_logger(cfg, world):
    from trainer.metrics import WandbLog
    return WandbLog(cfg, world)


ENGINES = {"hf": _hf_engine, "vllm": _vllm_engine}
CHECKPOINTERS = {"dcp": _dcp_checkpointer}
LOGGERS = {"jsonl": _jsonl_logger, "tensorboard": _tensorboard_logger, "wandb": _wandb_logger}
TASKS = {"arithmetic": _builtin_task, "countdown": _builtin_task, "jsonl": _builtin_task}
