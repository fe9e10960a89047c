"""The embedded tokenizer: one token per character of the built-in tasks plus the reasoning tags,
built as a transformers PreTrainedTokenizerFast so that save_pretrained exports a standard one."""
from __future__ import annotations

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>"]
CHARS = "0123456789+-*/=(),.:? abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def builtin_tokenizer(vocab_size: int | None = None):
    """``vocab_size``: padded with unused tokens up to that size (a model-sized lm_head)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIAL + list(CHARS)
    if vocab_size and vocab_size < len(tokens):
        raise ValueError(f"vocab_size: the built-in tokenizer has {len(tokens)} tokens; {vocab_size} cannot hold them")
    tokens += [f"<unused{i}>" for i in range((vocab_size or 0) - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])


def load_tokenizer(name: str, vocab_size: int = 0):
    """``vocab_size`` (builtin-tiny only): the built-in tokenizer padded to that size."""
    from trainer.model import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return builtin_tokenizer(BUILTIN_MODELS[name].get("vocab_size") or vocab_size or None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_text(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt
