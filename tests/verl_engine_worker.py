"""One run of verl's real FSDP2 engine (FSDPEngineWithLMHead) on CPU, for tests/test_verl.py: a tiny
random Qwen2, compute_log_prob (infer_batch), then one update (train_batch with verl's ppo_loss, an
optimizer step included). Run in verl's environment (scripts/verl_env.sh), as one process or under
torchrun (gloo); saves what it measured to OUT (torch.save).

verl runs on CPU once a platform whose device is the CPU is registered and VERL_ENGINE_DEVICE=cuda is
set before verl.workers.engine is imported (the engine registers itself for "cuda").

    python tests/verl_engine_worker.py OUT [--fused] [--backend torch|triton|liger] [--ours] [--tied]
        [--bf16] [--rmpad] [--attn sdpa|r1kernels] [--loss-mode vanilla] [--loss-agg-mode token-mean]
        [--entropy-coeff 0.01] [--no-entropy]
"""
import argparse
import os
import tempfile

os.environ["VERL_ENGINE_DEVICE"] = "cuda"
for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(name, default)

import torch  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402


class CPUPlatform(PlatformCUDA):
    """verl's CUDA platform with the CPU as its device and gloo as its backend."""

    device_name = "cpu"
    device_module = torch.cpu

    def is_available(self):
        return True

    def communication_backend_name(self):
        return "gloo"

    def current_device(self):
        return torch.device("cpu")

    def device_count(self):
        return 1

    def set_device(self, index):
        pass

    def synchronize(self, index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def empty_cache(self):
        pass


VOCAB, HIDDEN = 300, 32          # a vocabulary not a multiple of any block (verl #2899: not of 256)
PROMPT, RESPONSE = 10, 12
PROMPT_LENGTHS = (10, 3, 7, 5, 8, 2, 6, 4)
RESPONSE_LENGTHS = (12, 1, 6, 9, 3, 12, 7, 2)      # a length-1 response included
TEMPERATURE = 0.7


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fused", action="store_true", help="model.use_fused_kernels")
    parser.add_argument("--backend", default="torch", help="model.fused_kernel_options.impl_backend")
    parser.add_argument("--ours", action="store_true", help="import r1kernels.integrations.verl (external_lib)")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="verl's default bf16 mixed precision (else fp32)")
    parser.add_argument("--rmpad", action="store_true", help="model.use_remove_padding (packed rows)")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--loss-mode", default="vanilla")
    parser.add_argument("--loss-agg-mode", default="token-mean")
    parser.add_argument("--entropy-coeff", type=float, default=0.01)
    parser.add_argument("--no-entropy", action="store_true", help="calculate_entropy=False (no entropy bonus)")
    args = parser.parse_args()

    platform_manager.set_platform(CPUPlatform())
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if args.ours:
        import r1kernels.integrations.verl  # noqa: F401   what external_lib does in every worker
    elif args.attn == "r1kernels":
        import r1kernels.integrations.transformers as r1k_hf
        r1k_hf.register()

    from transformers import AutoModelForCausalLM, Qwen2Config
    from verl import DataProto
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    torch.manual_seed(0)
    path = os.path.join(tempfile.gettempdir(), f"r1k-verl-qwen2-{'tied' if args.tied else 'untied'}-{os.getpid()}")
    if rank == 0:
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=args.tied,
                             max_position_embeddings=64)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    path_list = [path]
    torch.distributed.broadcast_object_list(path_list, src=0)
    path = path_list[0]

    precision = None if args.bf16 else {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    micro = 2
    model_config = HFModelConfig(path=path, load_tokenizer=False, use_remove_padding=args.rmpad,
                                 use_fused_kernels=args.fused, fused_kernel_options={"impl_backend": args.backend},
                                 override_config={"attn_implementation": args.attn})
    engine_config = FSDPEngineConfig(forward_only=False, strategy="fsdp2", use_remove_padding=args.rmpad,
                                     use_dynamic_bsz=False, micro_batch_size_per_gpu=micro,
                                     infer_micro_batch_size_per_gpu=micro, mixed_precision=precision)
    engine_config.use_fused_kernels = args.fused
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=engine_config,
                                optimizer_config=FSDPOptimizerConfig(optimizer="SGD", lr=0.1, clip_grad=1e9,
                                                                     weight_decay=0.0),
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    lm_head = engine.module.get_output_embeddings().weight
    lm_head_type = type(lm_head).__name__

    # the batch, as verl's rollout leaves it (prompts left-padded, responses right-padded), split over ranks
    generator = torch.Generator().manual_seed(1)
    batch = len(PROMPT_LENGTHS)
    input_ids = torch.randint(0, VOCAB, (batch, PROMPT + RESPONSE), generator=generator)
    columns = torch.arange(PROMPT + RESPONSE)
    prompt_len, response_len = torch.tensor(PROMPT_LENGTHS)[:, None], torch.tensor(RESPONSE_LENGTHS)[:, None]
    attention_mask = ((columns >= PROMPT - prompt_len) & (columns < PROMPT + response_len)).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    response_mask = attention_mask[:, PROMPT:]
    advantages = torch.randn(batch, 1, generator=generator).expand(batch, RESPONSE).clone() * response_mask
    noise = 0.3 * torch.randn(batch, RESPONSE, generator=generator)      # old policy: clips bind
    rows = slice(rank * batch // world, (rank + 1) * batch // world)

    def tensordict(**extra):
        data = DataProto.from_single_dict(
            {"input_ids": input_ids[rows], "prompts": input_ids[rows, :PROMPT], "attention_mask": attention_mask[rows],
             "position_ids": position_ids[rows], "responses": input_ids[rows, PROMPT:],
             "response_mask": response_mask[rows], **{k: v[rows] for k, v in extra.items()}},
            meta_info={"temperature": TEMPERATURE})
        data = left_right_2_no_padding(data.to_tensordict())
        tu.assign_non_tensor(data, use_remove_padding=args.rmpad, use_dynamic_bsz=False,
                             micro_batch_size_per_gpu=micro, use_fused_kernels=args.fused,
                             calculate_entropy=not args.no_entropy,
                             global_batch_size=batch)
        return data

    data = tensordict()
    with engine.eval_mode():
        output = engine.infer_batch(data, loss_function=None)["model_output"]
    log_probs = no_padding_2_padding(output["log_probs"], data).float()
    entropy = None if args.no_entropy else no_padding_2_padding(output["entropy"], data).float()

    old = torch.zeros(batch, RESPONSE)
    old[rows] = log_probs.detach()
    torch.distributed.all_reduce(old)
    old = (old + noise) * response_mask
    actor = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=micro, ppo_mini_batch_size=batch,
                        entropy_coeff=args.entropy_coeff, loss_agg_mode=args.loss_agg_mode, clip_ratio=0.2,
                        clip_ratio_high=0.28, loss_scale_factor=RESPONSE, policy_loss={"loss_mode": args.loss_mode})
    data = tensordict(old_log_probs=old, advantages=advantages)
    with engine.train_mode():
        result = engine.train_batch(data, loss_function=lambda **kw: ppo_loss(actor, **kw))
    # verl's Metric objects (one per micro-batch, aggregated as verl aggregates them) as plain floats
    metrics = {name: float(value.aggregate() if hasattr(value, "aggregate") else value)
               for name, value in result["metrics"].items()}
    parameters = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
                  for name, p in engine.module.named_parameters()}

    if rank == 0:
        grad_norm = metrics.pop("grad_norm")
        torch.save({"log_probs": log_probs, "entropy": entropy, "response_mask": response_mask[rows],
                    "grad_norm": grad_norm, "metrics": metrics,
                    "parameters": parameters, "lm_head_type": lm_head_type, "world_size": world,
                    "temperature": TEMPERATURE}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
