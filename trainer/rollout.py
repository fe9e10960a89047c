"""Rollout engines: G completions per prompt. ``HFGenerateEngine`` (transformers generate: CPU and
GPU, works under FSDP2) and ``VLLMEngine`` (GPU, colocated in each rank's process, asleep between
generations, the policy's weights streamed in before each, sampling log-probs for the
importance-sampling correction)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from trainer import parallel


@dataclasses.dataclass
class Rollouts:
    prompt_ids: list          # [B*G] lists of token ids
    completion_ids: list      # [B*G] lists (ending with EOS when the model stopped)
    texts: list               # [B*G] decoded completions
    group: list               # [B*G] index of the prompt
    sampling_logprobs: Optional[list] = None   # [B*G] per completion token, when the engine returns them


def completion_text(tokenizer, ids: list) -> str:
    """The text rewards see: the completion decoded with its special tokens kept (the built-in
    tokenizer's reasoning tags are special tokens), without EOS and padding. One rule for every engine:
    vLLM's own text would drop the tags (skip_special_tokens)."""
    return tokenizer.decode([t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)])


class RolloutEngine:
    def generate(self, model, prompts: list, num_generations: int, greedy: bool = False) -> Rollouts:
        """G completions per prompt from the policy ``model`` as it is now."""
        raise NotImplementedError


class HFGenerateEngine(RolloutEngine):
    def __init__(self, tokenizer, cfg, world):
        self.tokenizer, self.cfg, self.world = tokenizer, cfg, world

    def _encode(self, prompts):
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    @torch.no_grad()
    def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
        tok = self.tokenizer
        encoded = self._encode(prompts)
        width = max(len(ids) for ids in encoded)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.world.device)
        attention = (torch.arange(width, device=input_ids.device)[None, :]
                     >= torch.tensor([width - len(ids) for ids in encoded], device=input_ids.device)[:, None]).long()
        previous = model.config._attn_implementation
        model.set_attn_implementation("sdpa")   # HF's own kernel for cached decoding; ours for training
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=not greedy,
                temperature=None if greedy else self.cfg.temperature, top_p=None if greedy else self.cfg.top_p,
                top_k=None, max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
                num_return_sequences=1 if greedy else num_generations, pad_token_id=pad,
                eos_token_id=tok.eos_token_id, synced_gpus=self.world.size > 1)
        finally:
            model.set_attn_implementation(previous)
            model.train(was_training)
        repeats = 1 if greedy else num_generations
        prompt_ids, completion_ids, texts, group = [], [], [], []
        for row in range(out.shape[0]):
            index = row // repeats
            generated = out[row, width:].tolist()
            if tok.eos_token_id in generated:
                generated = generated[: generated.index(tok.eos_token_id) + 1]
            else:
                generated = [t for t in generated if t != pad]
            prompt_ids.append(encoded[index])
            completion_ids.append(generated)
            texts.append(completion_text(tok, generated))
            group.append(index)
        return Rollouts(prompt_ids, completion_ids, texts, group)


# inclusive (the `vllm` extra): every call below was checked against the source of vLLM 0.22.0, 0.31.0
# (TRL 1.16's range) and 0.33.0 (the newest release at the time)
SUPPORTED_VLLM = ("0.22.0", "0.33.0")


def import_vllm():
    """vllm, within SUPPORTED_VLLM; otherwise an error naming the installed and supported versions."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("rollout.engine = 'vllm' needs vllm installed (GPU only): pip install -e '.[vllm]'") from err
    from packaging.version import Version

    installed = Version(Version(vllm.__version__).base_version)
    first, last = (Version(v) for v in SUPPORTED_VLLM)
    if not first <= installed <= last:
        raise RuntimeError(f"rollout.engine = 'vllm' supports vLLM {SUPPORTED_VLLM[0]} to {SUPPORTED_VLLM[1]}; "
                           f"vLLM {vllm.__version__} is installed")
    return vllm


def builtin_model_dir(cfg, tokenizer, world) -> str:
    """A directory vLLM can build a built-in model from, with no download: its config and tokenizer
    (no weights: the engine loads dummy ones, then the policy's), under ``checkpoint.dir``."""
    from trainer.model import builtin_config

    directory = os.path.join(cfg.checkpoint.dir, "vllm_" + cfg.model.name)
    if world.is_main:
        builtin_config(cfg.model, tokenizer).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    world.barrier()
    return directory


class VLLMEngine(RolloutEngine):
    """vLLM in each rank's own process, colocated with training (TRL's vllm_mode="colocate", verl's
    hybrid engine):

    - ``distributed_executor_backend="external_launcher"``: under torchrun every rank hosts its own
      engine on its own GPU, in process (no worker processes, so the model is reachable for weights);
      a single process gets the environment and the process group of one that this launcher expects;
    - ``logprobs_mode="processed_logprobs"``: the sampling log-probs after temperature and top-p, the
      distribution actually sampled, which the importance-sampling correction needs;
    - between generations the engine sleeps at level 2 (weights and KV cache freed: no CPU copy of
      weights that are about to be replaced), so every generation first wakes the weights and streams
      the policy's current ones into them, one parameter at a time (``full_tensor()`` of one FSDP2
      shard, never the whole model gathered on a rank): rollouts and evaluations therefore always use
      the current policy, after SFT and after a resume included.
    """

    def __init__(self, model_name: str, tokenizer, cfg, world, gpu_memory_utilization: float = 0.3,
                 load_format: str = "auto"):
        """``load_format="dummy"``: random weights instead of reading a checkpoint (the policy's are
        streamed in before every generation anyway)."""
        vllm = import_vllm()
        if world.device.type != "cuda":
            raise RuntimeError("rollout.engine = 'vllm' needs a GPU")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.sampling = vllm.SamplingParams
        parallel.launcher_environment(world)
        self.llm = vllm.LLM(model=model_name, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                            distributed_executor_backend="external_launcher", seed=world.rank,
                            logprobs_mode="processed_logprobs", load_format=load_format)
        self.llm.sleep(level=2)

    def _load_policy(self, model) -> None:
        """Wake the weights and stream the policy's into them (FSDP2 gathers one parameter at a time)."""
        torch.cuda.empty_cache()   # the training step's cached blocks back to the device, for vLLM's allocator
        self.llm.wake_up(tags=["weights"])
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, value in model.state_dict().items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            target.load_weights([(name, full.detach())])
            del full
        self.llm.reset_prefix_cache()

    def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
        self._load_policy(model)
        self.llm.wake_up(tags=["kv_cache"])
        params = self.sampling(n=1 if greedy else num_generations, temperature=0.0 if greedy else self.cfg.temperature,
                               top_p=1.0 if greedy else self.cfg.top_p,
                               max_tokens=max_new_tokens or self.cfg.max_new_tokens, logprobs=0)
        try:
            results = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self.llm.sleep(level=2)
        prompt_ids, completion_ids, texts, group, sampling = [], [], [], [], []
        for index, result in enumerate(results):
            for choice in result.outputs:
                prompt_ids.append(list(result.prompt_token_ids))
                completion_ids.append(list(choice.token_ids))
                texts.append(completion_text(self.tokenizer, choice.token_ids))
                group.append(index)
                sampling.append([lp[token].logprob for lp, token in zip(choice.logprobs, choice.token_ids)])
        return Rollouts(prompt_ids, completion_ids, texts, group, sampling)
