"""TRL's GRPOTrainer for two SGD steps on a tiny random Qwen2, as one rank of a run launched by
``accelerate launch`` (DeepSpeed ZeRO-3, FSDP2), torchrun (DDP) or plain python (one process), with
TRL's own loss (``--route plain``), ``patch()`` (``kernel``) or ``patch(loss=True)`` (``loss``).
Rank 0 writes every full parameter, the logged rows and the generations to ``OUT`` (torch.save).

CPU only: DeepSpeed runs on gloo with ``DS_ACCELERATOR=cpu``; accelerate turns FSDP on only for
GPU-like devices, so the FSDP2 run sets the accelerator state to FSDP after the trainer is built,
from the plugin ``accelerate launch`` described in the environment.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the lm_head must be partitioned by ZeRO-3: larger than DeepSpeed's default persistence threshold
# (1e5 elements, which open-r1's zero3.yaml keeps), or it stays whole on every rank and the bug hides
VOCAB, HIDDEN = 2048, 64


def _arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--route", choices=("plain", "kernel", "loss"), required=True)
    parser.add_argument("--engine", choices=("zero3", "fsdp2", "ddp", "single"), required=True)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--entropy-coef", type=float, default=0.05)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--shard-lm-head", action="store_true",
                        help="FSDP2 by hand: lm_head a unit of its own, resharded after its forward")
    return parser.parse_args()


def _model(directory, tied):
    import transformers

    from trainer.tokenizer import builtin_tokenizer
    tokenizer = builtin_tokenizer(VOCAB)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.Qwen2ForCausalLM(config)
    return model, tokenizer


def _enable_fsdp_on_cpu(trainer):
    """accelerate sets FSDP only for GPU-like devices; on CPU the launcher's plugin is installed here,
    in the state every Accelerator shares, before ``train()`` prepares the model."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()           # read from the FSDP_* variables accelerate launch set
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    if plugin.mixed_precision_policy is None and trainer.args.bf16:
        plugin.set_mixed_precision("bf16")


def _shard_by_hand(trainer):
    """A hand-written FSDP2 wrapping: each decoder layer, then lm_head alone (resharded after its
    forward, fully_shard's default), then the root."""
    from torch.distributed.fsdp import fully_shard

    model = trainer.model
    for layer in model.model.layers:
        fully_shard(layer)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        fully_shard(model.lm_head)
    fully_shard(model)
    trainer.model_wrapped = model


def full_parameters(trainer):
    """Every parameter, whole, by name (on every rank: the gathers are collective)."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    full = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                full[name] = p.detach().float().clone()
        elif hasattr(p, "full_tensor"):
            full[name] = p.full_tensor().detach().float().clone()
        else:
            full[name] = p.detach().float().clone()
    return full


def _released_weight_errors(trainer):
    """What ``linear_token_logprobs`` says when handed the lm_head weight where the engine has released
    it: as the model holds it outside any forward (a ZeRO-3 partition or an FSDP2 shard), and as it
    was inside lm_head's forward, read after (FSDP2 has freed that storage). None: no error."""
    import r1kernels

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    lm_head = model.get_output_embeddings()
    hidden = torch.randn(3, HIDDEN, dtype=torch.bfloat16 if trainer.args.bf16 else torch.float32)
    targets = torch.tensor([1, 2, 3])
    seen = {}
    # a pre-hook runs after the engine's (which unshards or gathers), a post-hook after its reshard
    hook = lm_head.register_forward_pre_hook(lambda module, args: seen.setdefault("weight", module.weight))
    with torch.no_grad():
        trainer.model_wrapped(input_ids=torch.tensor([[5, 6, 7]]))
    hook.remove()
    if hasattr(trainer.model_wrapped, "empty_partition_cache"):   # ZeRO-3 may keep a parameter it will reuse soon
        trainer.model_wrapped.empty_partition_cache()
    errors = {}
    for case, weight in (("outside_forward", lm_head.weight), ("read_after_forward", seen["weight"])):
        try:
            r1kernels.linear_token_logprobs(hidden.to(weight.dtype), weight, targets)
            errors[case] = None
        except (RuntimeError, TypeError) as error:
            errors[case] = f"{type(error).__name__}: {error}"
    return errors


def main():
    args = _arguments()
    import accelerate
    import datasets
    import transformers.training_args
    from trl import GRPOConfig, GRPOTrainer

    import r1kernels.integrations.trl as r1k_trl

    if args.bf16:       # transformers refuses bf16 without a GPU unless use_cpu, which DeepSpeed and FSDP exclude
        transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    model, tokenizer = _model(os.path.dirname(args.out), args.tied)
    initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    generated = []

    def reward(completions, **kwargs):
        generated.extend(completions)
        return [len(c) / 10 - 0.3 * c.count("1") for c in completions]

    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(args.out), "trainer"), report_to=[], save_strategy="no", seed=0,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2, logging_steps=1,
        optim="sgd", learning_rate=0.5, loss_type=args.loss_type, entropy_coef=args.entropy_coef, beta=0.0,
        gradient_accumulation_steps=args.accumulation, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=args.engine in ("single", "ddp"),
        ddp_backend="gloo" if args.engine != "single" else None)
    dataset = datasets.Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
    if args.route != "plain":
        r1k_trl.patch(loss=args.route == "loss")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    if args.engine == "fsdp2":
        _enable_fsdp_on_cpu(trainer)
        if args.shard_lm_head:
            _shard_by_hand(trainer)
    trainer.train()
    engine = type(trainer.model_wrapped).__name__
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    persistent = getattr(unwrapped.get_output_embeddings().weight, "ds_persist", None)
    errors = _released_weight_errors(trainer)
    parameters = full_parameters(trainer)
    rank = trainer.accelerator.process_index
    if rank == 0:
        rows = [h for h in trainer.state.log_history if "loss" in h]
        torch.save(dict(parameters=parameters, initial=initial, rows=rows, generated=generated, engine=engine,
                        processes=trainer.accelerator.num_processes, accelerate=accelerate.__version__,
                        lm_head_persistent=persistent, released_errors=errors), args.out)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():      # the trainer's teardown: see trainer.parallel.exit_rank
        from trainer.parallel import exit_rank
        torch.distributed.destroy_process_group()
        exit_rank(0)


if __name__ == "__main__":
    main()
