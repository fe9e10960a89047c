"""TRL's GRPOTrainer with vLLM rollouts (``use_vllm=True, vllm_mode="colocate"``), as open-r1 runs the R1
recipe, on vLLM's CPU build: two SGD steps of a tiny random Qwen2 for each (importance-sampling mode,
route) asked for, in this process (one rank of an ``accelerate launch`` DeepSpeed ZeRO-3 run, or plain
python). Routes: TRL's own loss (``plain``), ``patch()`` (``kernel``), ``patch(loss=True)`` (``loss``).
Rank 0 writes, per run, every full parameter, the logged rows, the generations and how many times our
fused loss ran to ``OUT`` (torch.save).

Two things differ from a user's script, both forced by running on CPU, neither by the code under test:

- the weight sync: TRL's colocated ``sync_weights`` writes each parameter with the vLLM model's
  ``load_weights``, which fails on the CPU build ("'Parameter' object has no attribute 'weight_loader'":
  it repacks its linear weights after loading). The replacement streams the same tensors (TRL's own
  ``_iter_named_params``, ZeRO-3's gathers included, on every rank) through the worker's
  ``reload_weights``, which redoes that processing, as this project's trainer syncs its engine;
- one engine per process: vLLM takes 10-40 s to start on 2 cores, so the runs of a process share the
  first run's engine (every run streams its initial weights in before its first generation, and the
  trainer's ``set_seed`` resets the sampler's generator: a run's generations are those of a fresh
  process, which the tests check against a run in a process of its own).

``--stale`` keeps the sampler on the initial weights after the first sync (rollouts from an old policy,
as an asynchronous sampler hands them): the importance-sampling ratios then spread far from 1 and the
``*_mask`` modes zero some, where a synced CPU sampler differs from the trainer by bf16 rounding alone.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_distributed_worker import full_parameters  # noqa: E402  (this folder is on the path: a script's own)

# vLLM's CPU attention needs a head dim of at least 32 (hidden 64, 2 heads); under ZeRO-3 the lm_head must be
# partitioned, so larger than DeepSpeed's persistence threshold (1e5 elements): 2048 x 64
VOCAB, HIDDEN, HEADS = 2048, 64, 2
# TRL's vllm_importance_sampling_mode values, its default first (the tests take them from here)
IS_MODES = ("sequence_mask", "sequence_truncate", "token_truncate", "token_mask")
ROUTES = ("plain", "kernel", "loss")


def _arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--runs", required=True, help="comma-separated MODE/ROUTE, e.g. sequence_mask/loss")
    parser.add_argument("--stale", action="store_true")
    parser.add_argument("--clip", type=float, nargs=2, metavar=("MIN", "MAX"), default=(None, 3.0),
                        help="vllm_importance_sampling_clip_min / _max (TRL's defaults: None, 3.0)")
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--zero3", action="store_true", help="launched by accelerate with DeepSpeed ZeRO-3")
    return parser.parse_args()


def _save_model(directory):
    """A tiny random Qwen2 and the built-in tokenizer saved where vLLM (given the model's path by TRL) and
    the trainer both load them."""
    import transformers

    from trainer.tokenizer import builtin_tokenizer
    tokenizer = builtin_tokenizer(VOCAB)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _share_one_engine():
    """TRL builds its engine with ``vllm.LLM(...)``: the first one built is handed to every later trainer."""
    import trl.generation.vllm_generation as trl_vllm

    build, engines = trl_vllm.LLM, []

    def shared(**kwargs):
        if not engines:
            engines.append(build(**kwargs))
        return engines[0]

    trl_vllm.LLM = shared
    return engines


def _sync_through_reload_weights(generation, stale: bool):
    """Replaces TRL's colocated ``sync_weights`` (see the module docstring for why)."""
    synced = []

    def sync():
        if stale and synced:
            return
        dtype = generation.llm.llm_engine.model_config.dtype
        weights = [(name, tensor.detach().to(dtype).clone()) for name, tensor in generation._iter_named_params()]
        generation.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights),
                                                                    is_checkpoint_format=True))
        generation.llm.reset_prefix_cache()
        synced.append(True)

    generation.sync_weights = sync


def _train(model_dir, tokenizer, mode, route, args):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    import r1kernels.grpo
    import r1kernels.integrations.trl as r1k_trl

    generated, fused_calls = [], []

    def reward(completions, **kwargs):
        generated.extend(completions)
        return [len(c) / 10 - 0.3 * c.count("1") for c in completions]

    config = GRPOConfig(
        output_dir=os.path.join(model_dir, f"trainer-{mode}-{route}"), report_to=[], save_strategy="no", seed=0,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2, logging_steps=1,
        optim="sgd", learning_rate=0.5, loss_type=args.loss_type, beta=0.0, bf16=False,
        use_cpu=not args.zero3, ddp_backend="gloo" if args.zero3 else None,
        use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_mode=mode, vllm_max_model_length=64,
        vllm_importance_sampling_clip_min=args.clip[0], vllm_importance_sampling_clip_max=args.clip[1])
    dataset = datasets.Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
    fused = r1kernels.grpo.linear_grpo_loss
    r1kernels.grpo.linear_grpo_loss = lambda *a, **k: fused_calls.append(1) or fused(*a, **k)
    if route != "plain":
        r1k_trl.patch(loss=route == "loss")
    try:
        trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        initial = full_parameters(trainer)
        _sync_through_reload_weights(trainer.vllm_generation, args.stale)
        trainer.train()
    finally:
        r1k_trl.unpatch()
        r1kernels.grpo.linear_grpo_loss = fused
    rows = [h for h in trainer.state.log_history if "loss" in h]
    lm_head = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
    return dict(parameters=full_parameters(trainer), initial=initial, rows=rows, generated=generated,
                fused_calls=len(fused_calls), processes=trainer.accelerator.num_processes,
                engine=type(trainer.model_wrapped).__name__, lm_head_persistent=getattr(lm_head, "ds_persist", None),
                vllm_dtype=str(trainer.vllm_generation.llm.llm_engine.model_config.dtype)), trainer.accelerator


def main():
    args = _arguments()
    # each rank saves the same model (seeded) to a directory of its own: no rank waits for another's files
    model_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"model-rank{os.environ.get('RANK', '0')}")
    tokenizer = _save_model(model_dir)
    _share_one_engine()
    results, accelerator = {}, None
    for run in args.runs.split(","):
        mode, route = run.split("/")
        if mode not in IS_MODES or route not in ROUTES:
            raise SystemExit(f"unknown run {run!r}: MODE in {IS_MODES}, ROUTE in {ROUTES}")
        results[run], accelerator = _train(model_dir, tokenizer, mode, route, args)
    if accelerator.process_index == 0:
        torch.save(results, args.out)
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():      # the trainer's teardown: see trainer.parallel.exit_rank
        from trainer.parallel import exit_rank
        torch.distributed.destroy_process_group()
        exit_rank(0)


if __name__ == "__main__":
    main()
