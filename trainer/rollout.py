"""Rollout engines: G completions per prompt. ``HFGenerateEngine`` (transformers generate: CPU and
GPU, works under FSDP2) and ``VLLMEngine`` (GPU, colocated, sleep/wake, weights synced after each
optimizer step, sampling log-probs for the importance-sampling correction)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Rollouts:
    prompt_ids: list          # [B*G] lists of token ids
    completion_ids: list      # [B*G] lists (ending with EOS when the model stopped)
    texts: list               # [B*G] decoded completions
    group: list               # [B*G] index of the prompt
    sampling_logprobs: Optional[list] = None   # [B*G] per completion token, when the engine returns them


class RolloutEngine:
    def generate(self, model, prompts: list, num_generations: int, greedy: bool = False) -> Rollouts:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Called after each optimizer step (engines holding their own copy of the weights)."""


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
            texts.append(tok.decode([t for t in generated if t not in (tok.eos_token_id, pad)]))
            group.append(index)
        return Rollouts(prompt_ids, completion_ids, texts, group)


class VLLMEngine(RolloutEngine):
    """vLLM colocated with training on the same GPU: it sleeps (frees its memory) while we train,
    wakes to generate, and receives the policy's weights after each optimizer step."""

    def __init__(self, model_name: str, tokenizer, cfg, world, gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise RuntimeError("rollout.engine = 'vllm' needs vllm installed (GPU only)") from err
        if world.device.type != "cuda":
            raise RuntimeError("rollout.engine = 'vllm' needs a GPU")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.sampling = SamplingParams
        self.llm = LLM(model=model_name, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        self.llm.sleep(level=1)

    def sync_weights(self, model) -> None:
        state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                 for name, p in model.state_dict().items()}
        self.llm.wake_up()
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        runner.load_weights(state.items())
        self.llm.sleep(level=1)

    def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
        self.llm.wake_up()
        params = self.sampling(n=1 if greedy else num_generations, temperature=0.0 if greedy else self.cfg.temperature,
                               top_p=1.0 if greedy else self.cfg.top_p,
                               max_tokens=max_new_tokens or self.cfg.max_new_tokens, logprobs=0)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        self.llm.sleep(level=1)
        prompt_ids, completion_ids, texts, group, sampling = [], [], [], [], []
        for index, result in enumerate(results):
            for choice in result.outputs:
                prompt_ids.append(list(result.prompt_token_ids))
                completion_ids.append(list(choice.token_ids))
                texts.append(choice.text)
                group.append(index)
                sampling.append([next(iter(lp.values())).logprob for lp in choice.logprobs])
        return Rollouts(prompt_ids, completion_ids, texts, group, sampling)
