"""The R1 pipeline: optional pretraining into a base model (the built-in model on its task's web-like
corpus), optional cold-start SFT on worked traces, then GRPO (R1-Zero: pretraining, no SFT)."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import torch

import r1kernels
from r1kernels import hardware
from trainer import parallel, registry, rewards as reward_fns, step as grpo_step
from trainer.checkpoint import PHASES
from trainer.metrics import peak_memory_bytes
from trainer.model import BUILTIN_MODELS, attach_fused_head, build_model, decoder_layers
from trainer.tokenizer import CHARS as BUILTIN_CHARS, load_tokenizer, prompt_text



SUPERVISED_PHASES = PHASES[:PHASES.index("grpo")]   # pretrain, sft: next-token phases before GRPO
RESUME_FREE = ("checkpoint.", "log.")   # where and how often to save, and what to print: free to differ on a resume


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def lr_lambda(warmup: int, total: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return factor


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.world = parallel.init_world()
        random.seed(cfg.seed + self.world.rank)
        torch.manual_seed(cfg.seed + self.world.rank)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.vocab_size)
        torch.manual_seed(cfg.seed)       # identical initial weights on every rank
        model = build_model(cfg.model, self.tokenizer, dtype).to(self.world.device)
        attach_fused_head(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.bad_steps = self.skipped_steps = 0   # updates skipped for a non-finite gradient norm (in a row, in all)
        self.ref_model = None            # built at the start of GRPO (see reference_model)
        self.model = parallel.shard_model(model, decoder_layers(model), self.world, cfg.parallel.fsdp,
                                          cfg.parallel.mixed_precision)
        torch.manual_seed(cfg.seed + 1000 + self.world.rank)   # per-rank sampling streams
        self.data = registry.load("data.task", cfg.data.task, registry.TASKS)(cfg.data)
        if cfg.pretrain.steps and not getattr(self.data, "has_base_corpus", False):
            raise ValueError(f"pretrain.steps = {cfg.pretrain.steps} needs a task with a base corpus (the built-in "
                             f"ones); {cfg.data.task!r} has none: start from a pretrained model.name instead")
        if cfg.sft.steps and not getattr(self.data, "has_traces", True):
            raise ValueError(f"sft.steps = {cfg.sft.steps} needs worked traces: give data.sft_jsonl ({{\"prompt\", "
                             "\"completion\"} records) or completions in data.train_jsonl, or set sft.steps = 0")
        if cfg.model.name in BUILTIN_MODELS:
            missing = sorted(set("".join(getattr(self.data, "texts", list)())) - set(BUILTIN_CHARS))
            if missing:
                raise ValueError(f"the builtin tokenizer has no token for {''.join(missing[:20])!r} in the task's "
                                 "text (it would become <unk>): use a model with its own tokenizer (model.name)")
        reward_model = reward_fns.RewardModel(cfg.model.reward_model) if cfg.model.reward_model else None
        self.rewards = reward_fns.RewardSet(vars(cfg.rewards), reward_model, timeout=cfg.rewards.timeout_s,
                                            custom=reward_fns.load_custom(cfg.rewards.custom))
        engine_class = registry.load("rollout.engine", cfg.rollout.engine, registry.ENGINES)
        self.engine = engine_class(cfg, self.tokenizer, self.world)
        self.checkpointer = registry.load("checkpoint.checkpointer", cfg.checkpoint.checkpointer,
                                          registry.CHECKPOINTERS)(cfg.checkpoint, self.world)
        self.log = registry.load("log.logger", cfg.log.logger, registry.LOGGERS)(cfg, self.world)

    # ------------------------------------------------------------------ helpers
    def _optimizer(self, lr, total_steps, warmup, schedule):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.cfg.grpo.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps, schedule))
        return optimizer, scheduler

    def _shard(self, items):
        return items[self.world.rank::self.world.size]

    def _global(self, *values):
        total = self.world.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return total.tolist()

    def reference_model(self, resumed_in_grpo: bool):
        """The frozen reference of the KL term: the policy at the start of GRPO, after SFT, as in R1.
        It is copied shard by shard from the policy (both sharded alike, so nothing is gathered); on a
        resume inside GRPO it is the last supervised phase's final checkpoint (SFT's, else pretraining's),
        or with neither the seeded initial weights."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        cfg = self.cfg
        devices = [self.world.device] if self.world.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):     # the sampling streams go on untouched
            torch.manual_seed(cfg.seed)                   # the policy's initial weights
            dtype = next(self.model.parameters()).dtype
            ref = build_model(cfg.model, self.tokenizer, dtype).to(self.world.device)
        attach_fused_head(ref)
        ref = parallel.shard_model(ref, decoder_layers(ref), self.world, cfg.parallel.fsdp,
                                   cfg.parallel.mixed_precision)
        done = [phase for phase in SUPERVISED_PHASES if getattr(cfg, phase).steps]
        if not resumed_in_grpo:
            set_model_state_dict(ref, get_model_state_dict(self.model))
        elif done:
            self.checkpointer.load_model(done[-1], getattr(cfg, done[-1]).steps, ref)
        return ref.eval().requires_grad_(False)

    def _clip_and_step(self, optimizer, scheduler, phase: str, step: int) -> float:
        """Clip and apply the gradients; returns the gradient norm. A non-finite norm (a NaN or inf loss
        or gradient on any rank: the norm is global) skips the update and is logged; grpo.max_bad_steps
        such steps in a row stop the run with an error naming the step."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grpo.max_grad_norm or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            optimizer.step()
            scheduler.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.world.is_main:
                print(f"{phase} step {step}: gradient norm {norm}: update skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= self.cfg.grpo.max_bad_steps:
                raise RuntimeError(f"{phase} step {step}: {self.bad_steps} updates in a row had a non-finite loss or "
                                   f"gradient norm (grpo.max_bad_steps = {self.cfg.grpo.max_bad_steps}); stopping")
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _save(self, phase, step, optimizer, scheduler):
        self.checkpointer.save(phase, step, self.model, optimizer, scheduler, dataclasses.asdict(self.cfg))

    def _check_config(self, path):
        """Resuming with another config than the checkpoint's is an error listing the differences,
        unless checkpoint.allow_config_change (then the new values apply)."""
        saved = self.checkpointer.saved_config(path)
        if saved is None:
            return
        now = _flat(dataclasses.asdict(self.cfg))
        before = _flat(saved)
        changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(now) | set(before))
                   if before.get(key) != now.get(key) and not key.startswith(RESUME_FREE)]
        if changed and not self.cfg.checkpoint.allow_config_change:
            raise ValueError(f"the config differs from the one {path} was saved with:\n  " + "\n  ".join(changed)
                             + "\nresume with the same config, or set checkpoint.allow_config_change = true to "
                             "apply the new values")
        if changed and self.world.is_main:
            print("resuming with a changed config (the new values apply):\n  " + "\n  ".join(changed))

    def _apply_optimizer_config(self, optimizer, scheduler, phase):
        """The config's lr and weight decay on a loaded optimizer (its state carries the saved ones): the
        schedule itself is rebuilt from the config, the base lr is restored from the state, so set it."""
        lr = getattr(self.cfg, phase).lr
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group.update(initial_lr=lr, lr=lr * schedule(scheduler.last_epoch), weight_decay=self.cfg.grpo.weight_decay)

    def _maybe_checkpoint(self, phase, step, total, optimizer, scheduler):
        every = self.cfg.checkpoint.every
        if every and (step + 1) % every == 0 and step + 1 < total:
            self._save(phase, step + 1, optimizer, scheduler)

    # ------------------------------------------------------------------ stages
    def _supervised_batch(self, phase: str, step: int):
        """(prompt ids, completion ids) of one step of a supervised phase: for SFT the worked traces (the
        loss on the completion), for pretraining the base corpus' documents (the loss on every token after
        the first: a document has no prompt)."""
        eos = self.tokenizer.eos_token_id
        if phase == "pretrain":
            documents = self._shard(self.data.base_corpus(step, self.cfg.pretrain.batch_size))
            ids = [self.tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in documents]
            return [i[:1] for i in ids], [i[1:] for i in ids]
        examples = self._shard(self.data.train("sft", step, self.cfg.sft.batch_size))
        examples = [e for e in examples if e.get("trace")]
        prompts = [self.tokenizer(prompt_text(self.tokenizer, e["prompt"], self.cfg.data.use_chat_template),
                                  add_special_tokens=False)["input_ids"] for e in examples]
        completions = [self.tokenizer(e["trace"], add_special_tokens=False)["input_ids"] + [eos] for e in examples]
        return prompts, completions

    def supervised(self, phase: str, start_step=0, optimizer=None, scheduler=None):
        """Next-token training (mean negative log-likelihood of the supervised tokens) of ``phase``:
        "pretrain" (the base corpus) or "sft" (the cold start)."""
        steps = getattr(self.cfg, phase).steps
        if start_step >= steps:           # a skipped phase (0 steps) builds no optimizer
            return optimizer, scheduler
        if optimizer is None:
            optimizer, scheduler = self._optimizer_for(phase)
        for step in range(start_step, steps):
            prompts, completions = self._supervised_batch(phase, step)
            batches = grpo_step.build_micro_batches(prompts, completions, [0.0] * len(prompts),
                                                    self.cfg.grpo.micro_batch_tokens, self.cfg.grpo.packing,
                                                    self.tokenizer.pad_token_id, self.world.device)
            (global_tokens,) = self._global(sum(mb.num_tokens for mb in batches))
            total_loss = 0.0
            for mb in batches:
                head = grpo_step.make_head(mb, 1.0, self.cfg.grpo.kernels)
                logp = self.model(**grpo_step.model_inputs(mb), head=head)
                loss = -(logp * mb.mask.reshape(logp.shape)).sum() / max(global_tokens, 1.0) * self.world.size
                loss.backward()
                total_loss += loss.item() / self.world.size
            self._clip_and_step(optimizer, scheduler, phase, step)
            self.log.log({"phase": phase, "step": step, "loss": total_loss}, steps)
            self._maybe_checkpoint(phase, step, steps, optimizer, scheduler)
        return optimizer, scheduler

    @torch.no_grad()
    def evaluate(self) -> float:
        examples = self._shard(self.data.held_out())
        correct = 0.0
        for start in range(0, len(examples), 64):
            chunk = examples[start:start + 64]
            prompts = [prompt_text(self.tokenizer, e["prompt"], self.cfg.data.use_chat_template) for e in chunk]
            out = self.engine.generate(self.model, prompts, 1, greedy=True,
                                       max_new_tokens=self.cfg.rollout.eval_max_new_tokens)
            correct += sum(reward_fns.accuracy(text, e) for text, e in zip(out.texts, chunk))
        total_correct, total = self._global(correct, len(examples))
        return total_correct / max(total, 1.0)

    def grpo(self, start_step=0, optimizer=None, scheduler=None):
        cfg = self.cfg.grpo
        if optimizer is None:
            optimizer, scheduler = self._optimizer_for("grpo")
        weights = torch.tensor(self.rewards.weights)
        accuracy_column = self.rewards.names.index("accuracy") if "accuracy" in self.rewards.names else None
        # MFU against the datasheet's dense bf16 rate, for a GPU r1kernels/hardware.py lists
        peaks = hardware.peak_for(torch.cuda.get_device_name(self.world.device)) \
            if self.world.device.type == "cuda" else None
        for step in range(start_step, cfg.steps):
            examples = self._shard(self.data.train("grpo", step, cfg.prompts_per_step))
            prompts = [prompt_text(self.tokenizer, e["prompt"], self.cfg.data.use_chat_template) for e in examples]
            t0 = time.perf_counter()
            rollouts = self.engine.generate(self.model, prompts, cfg.num_generations)
            t_rollout = time.perf_counter() - t0
            failures_before = sum(self.rewards.failures.values())
            scores = torch.tensor(self.rewards.score(rollouts.texts, [examples[g] for g in rollouts.group]),
                                  dtype=torch.float32)
            advantages = r1kernels.group_advantages(scores, group_size=cfg.num_generations,
                                                    estimator=cfg.advantage_estimator,
                                                    scale=cfg.scale_rewards,
                                                    reward_weights=weights)
            t1 = time.perf_counter()
            row = self.update(rollouts.prompt_ids, rollouts.completion_ids, advantages.tolist(), optimizer, scheduler,
                              sampling_logprobs=rollouts.sampling_logprobs, step=step)
            t_train = time.perf_counter() - t1
            generated = sum(len(c) for c in rollouts.completion_ids)
            g_generated, g_tokens = self._global(generated, row.pop("tokens"))
            combined = (torch.nan_to_num(scores) * weights).sum(1)
            row.update(phase="grpo", step=step, reward=float(combined.mean()),
                       completion_len=sum(len(c) for c in rollouts.completion_ids) / len(rollouts.completion_ids),
                       rollout_tok_s=g_generated / t_rollout, train_tok_s=g_tokens / t_train,
                       peak_mem_mib=peak_memory_bytes(self.world.device) / 2**20, lr=scheduler.get_last_lr()[0])
            for k, name in enumerate(self.rewards.names):
                row[f"reward_{name}"] = float(torch.nanmean(scores[:, k]))
            row["reward_failures"] = sum(self.rewards.failures.values()) - failures_before
            if accuracy_column is not None:
                row["accuracy"] = float(torch.nanmean(scores[:, accuracy_column]))
            if peaks is not None:
                row["mfu"] = 6 * self.n_params * g_tokens / t_train / (peaks[1]["bf16"] * self.world.size)
            every = self.cfg.log.eval_every
            row["eval_accuracy"] = self.evaluate() if every and (step + 1) % every == 0 else None
            self.log.log(row, cfg.steps)
            self._maybe_checkpoint("grpo", step, cfg.steps, optimizer, scheduler)
        return optimizer, scheduler

    def update(self, prompt_ids, completion_ids, advantages, optimizer, scheduler, sampling_logprobs=None,
               step: int = 0) -> dict:
        """num_iterations optimizer steps on one batch of rollouts; returns averaged loss metrics.

        With the sampler's per-token log-probs (vLLM), the policy term is multiplied by the truncated
        importance ratio min(exp(old - sampling), is_cap) that corrects for the sampler/trainer mismatch,
        and the mismatch itself is logged (sampler_logp_diff_mean / _max over completion tokens)."""
        cfg = self.cfg.grpo
        temperature = self.cfg.rollout.temperature
        batches = grpo_step.build_micro_batches(prompt_ids, completion_ids, advantages, cfg.micro_batch_tokens,
                                                cfg.packing, self.tokenizer.pad_token_id, self.world.device)
        max_completion_length = self.cfg.rollout.max_new_tokens
        (normaliser,) = self._global(grpo_step.local_normaliser(cfg.loss_type, batches, max_completion_length))
        scale = grpo_step.loss_scale(normaliser, self.world.size)
        if cfg.num_iterations > 1 or sampling_logprobs is not None:
            for mb in batches:
                mb.old_logprobs = grpo_step.model_logprobs(self.model, mb, temperature, cfg.kernels)
        mismatch = None
        if sampling_logprobs is not None:
            parts = [grpo_step.sampler_mismatch(mb, sampling_logprobs) for mb in batches]
            total, count = self._global(sum(p[0] for p in parts), sum(p[1] for p in parts))
            mismatch = dict(sampler_logp_diff_mean=total / max(count, 1.0),
                            sampler_logp_diff_max=self.world.all_reduce_max(max((p[2] for p in parts), default=0.0)))
            for mb in batches:
                mb.is_ratio = grpo_step.importance_ratio(mb, sampling_logprobs, cfg.is_cap)
            if cfg.num_iterations == 1:   # on-policy: the ratio inside the loss stays 1 (old = detached current)
                for mb in batches:
                    mb.old_logprobs = None
        if self.ref_model is not None:
            for mb in batches:
                mb.ref_logprobs = grpo_step.model_logprobs(self.ref_model, mb, temperature, cfg.kernels)
        options = grpo_step.policy_loss_options(cfg)
        sums, extremes, weight_total = {}, {}, 0.0
        for _ in range(cfg.num_iterations):
            loss_total = 0.0
            for mb in batches:
                out = grpo_step.micro_batch_loss(self.model, mb, cfg, temperature, max_completion_length, options)
                loss = out.loss_sum * scale
                loss.backward()
                loss_total += loss.item() / self.world.size
                for key, value in out.metrics.items():
                    if key == "policy_loss":                 # a micro-batch's; the row has the batch's loss
                        continue
                    value = float(value)
                    if key.endswith(("_min", "_max")):     # extremes stay extremes (a NaN: no sequence had one)
                        pick = min if key.endswith("_min") else max
                        kept = extremes.get(key, math.nan)
                        extremes[key] = value if math.isnan(kept) else kept if math.isnan(value) else pick(kept, value)
                    else:
                        sums[key] = sums.get(key, 0.0) + value * mb.num_tokens
                weight_total += mb.num_tokens
            grad_norm = self._clip_and_step(optimizer, scheduler, "grpo", step)
        (loss_total,) = self._global(loss_total)
        row = {key: value / max(weight_total, 1.0) for key, value in sums.items()}
        row.update(extremes)
        row.update(mismatch or {})
        row.update(loss=loss_total, grad_norm=grad_norm,
                   tokens=sum(int(mb.input_ids.ne(self.tokenizer.pad_token_id).sum()) for mb in batches)
                   * cfg.num_iterations)
        return row

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        cfg = self.cfg
        phase, start = SUPERVISED_PHASES[0], 0
        optimizer = scheduler = None
        resumed = self.checkpointer.latest() if cfg.checkpoint.resume else None
        if cfg.checkpoint.resume and not resumed:
            message = f"checkpoint.resume = true, but {cfg.checkpoint.dir} holds no checkpoint"
            if cfg.checkpoint.resume_strict:
                raise FileNotFoundError(f"{message} (checkpoint.resume_strict = true): check checkpoint.dir")
            if self.world.is_main:
                print(f"{message}: starting a fresh run (checkpoint.resume_strict = true makes this an error)")
        if resumed:
            phase, start = self.checkpointer.phase_and_step(resumed)
            self._check_config(resumed)
            if phase == "grpo" and start >= cfg.grpo.steps:
                message = (f"{resumed}: this run already finished its {start} GRPO steps (grpo.steps = "
                           f"{cfg.grpo.steps}); nothing to resume. Raise grpo.steps (with "
                           "checkpoint.allow_config_change = true) to train further")
                if self.world.is_main:
                    print(message)
                return {"before": None, "after": None, "summary": message, "rows": []}
            optimizer, scheduler = self._optimizer_for(phase)
            self.checkpointer.load(resumed, self.model, optimizer, scheduler)
            self._apply_optimizer_config(optimizer, scheduler, phase)
            if self.world.is_main:
                print(f"resumed from {resumed} ({phase} step {start})")
        self.log.begin((phase, start) if resumed else None)
        resumed_in_grpo = phase == "grpo"
        for name in SUPERVISED_PHASES[SUPERVISED_PHASES.index(phase):] if not resumed_in_grpo else ():
            steps = getattr(cfg, name).steps
            optimizer, scheduler = self.supervised(name, start, optimizer, scheduler)
            if steps and cfg.checkpoint.every and start < steps:
                self._save(name, steps, optimizer, scheduler)
            start, optimizer, scheduler = 0, None, None
        if cfg.model.reference_model:
            self.ref_model = self.reference_model(resumed_in_grpo)
        before = self.evaluate()
        if self.world.is_main:
            print(f"held-out accuracy before GRPO: {before * 100:.1f}%")
        optimizer, scheduler = self.grpo(start, optimizer, scheduler)
        after = self.evaluate()
        if self.world.is_main:
            print(f"held-out accuracy after GRPO: {after * 100:.1f}%")
        if cfg.checkpoint.every:
            self._save("grpo", cfg.grpo.steps, optimizer, scheduler)
        summary = self.log.summary(before, after, os.path.join(cfg.checkpoint.dir, "reward.png")
                                   if cfg.log.plot else None) if self.world.is_main else ""
        if cfg.checkpoint.export:
            self.export(os.path.join(cfg.checkpoint.dir, "final"))
        return {"before": before, "after": after, "summary": summary, "rows": self.log.rows}

    def _optimizer_for(self, phase):
        if phase in SUPERVISED_PHASES:
            section = getattr(self.cfg, phase)
            return self._optimizer(section.lr, section.steps, min(10, section.steps), "cosine")
        g = self.cfg.grpo
        return self._optimizer(g.lr, g.steps * g.num_iterations, g.warmup_steps, g.lr_schedule)

    def close(self):
        """Release the rollout engine (an engine of your own may have no ``close``), then the process group."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self.world.close()

    def export(self, directory: str):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            self.model.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)
            print(f"exported the policy to {directory}")
        self.world.barrier()
