"""Tiny causal LMs and their tokenizers, built locally in seconds: what tests and the offline demo fine-tune
instead of `gpt2` (or a Llama or Qwen2 model), through the same `from_pretrained` loading code (nothing comes
from the Hub here). Each tokenizer has its architecture's special tokens, so code that assumed GPT-2's
`<|endoftext|>` or a pad token shows up: the Llama one has neither, the Qwen2 one has `<|endoftext|>` but
ends a text with `<|im_end|>`."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
QWEN2_EOS, QWEN2_PAD = "<|im_end|>", "<|endoftext|>"


def save_tokenizer(directory: Path, corpus: list[str], vocab_size: int, model_max_length: int, *,
                   special_tokens: list[str], prepend: str | None = None, **roles: str):
    """Train a byte-level BPE tokenizer on `corpus` and save it; `prepend`: a token added before every text,
    as Llama's tokenizer adds its BOS. `roles`: bos_token, eos_token, pad_token, unk_token."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=special_tokens)
    if prepend:
        bpe.post_processor = TemplateProcessing(single=f"{prepend} $A", pair=f"{prepend} $A {prepend} $B",
                                                special_tokens=[(prepend, bpe.token_to_id(prepend))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=model_max_length, **roles)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_model(directory: Path, model_class, config, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    return directory


def build_tiny_gpt2(directory: Path, corpus: list[str], *, vocab_size: int = 512, n_positions: int = 128,
                    n_embd: int = 64, n_layer: int = 2, n_head: int = 2, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer trained on `corpus`, saved with a randomly initialised GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = save_tokenizer(directory, corpus, vocab_size, n_positions, special_tokens=[EOS],
                               bos_token=EOS, eos_token=EOS, unk_token=EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_model(directory, GPT2LMHeadModel, config, seed)


def build_tiny_llama(directory: Path, corpus: list[str], *, vocab_size: int = 512, max_position_embeddings: int = 128,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM with Llama 3's special tokens: a BOS before every text, EOS
    `<|end_of_text|>`, no `<|endoftext|>` and no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = save_tokenizer(directory, corpus, vocab_size, max_position_embeddings,
                               special_tokens=[LLAMA_BOS, LLAMA_EOS], prepend=LLAMA_BOS,
                               bos_token=LLAMA_BOS, eos_token=LLAMA_EOS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return save_model(directory, LlamaForCausalLM, config, seed)


def build_tiny_qwen2(directory: Path, corpus: list[str], *, vocab_size: int = 512, max_position_embeddings: int = 128,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Qwen2ForCausalLM with Qwen2-Instruct's special tokens: no BOS, EOS `<|im_end|>`,
    and `<|endoftext|>` as its pad token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = save_tokenizer(directory, corpus, vocab_size, max_position_embeddings,
                               special_tokens=[QWEN2_PAD, "<|im_start|>", QWEN2_EOS],
                               eos_token=QWEN2_EOS, pad_token=QWEN2_PAD)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position_embeddings, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return save_model(directory, Qwen2ForCausalLM, config, seed)


TINY_MODELS = {"gpt2": build_tiny_gpt2, "llama": build_tiny_llama, "qwen2": build_tiny_qwen2}
