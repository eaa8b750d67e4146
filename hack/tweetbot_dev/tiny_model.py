"""A tiny GPT-2 and its tokenizer, built locally in seconds: what tests and the offline demo fine-tune
instead of `gpt2`, through the same `from_pretrained` loading code (nothing comes from the Hub here)."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def build_tiny_gpt2(directory: Path, corpus: list[str], *, vocab_size: int = 512, n_positions: int = 128,
                    n_embd: int = 64, n_layer: int = 2, n_head: int = 2, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it with a randomly initialised GPT-2."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        model_max_length=n_positions)
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
