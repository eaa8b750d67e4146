"""LoRA (`spec.training.method: lora`): the base model wrapped with peft's low-rank adapters before training,
and after it the adapters merged into the base (`publish: merged`, a model that loads like a full fine-tune) or
saved alone, naming the base they need (`publish: adapter`).

Checkpoints need nothing of their own: for a peft model the Trainer saves the adapter weights
(adapter_model.safetensors, adapter_config.json) beside the optimizer state, `checkpoints.py` uploads whatever
the checkpoint directory holds, and the Trainer's resume loads the adapter back into the wrapped model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import LoraTargetsNotFound

log = logging.getLogger("tweetbot.train")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
ALL_LINEAR = "all-linear"


def target_modules(names: list[str] | tuple[str, ...] | None) -> list[str] | str | None:
    """peft's `target_modules` for spec.training.lora.targetModules: None for peft's default for the architecture,
    the string "all-linear" (peft reads it as every linear layer only as a string, not in a list), else the names."""
    if not names:
        return None
    if list(names) == [ALL_LINEAR]:
        return ALL_LINEAR
    return list(names)


def lora_config(r: int, alpha: int, dropout: float, targets: list[str] | tuple[str, ...] | None):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules(targets))


def with_adapters(model, r: int, alpha: int, dropout: float, targets: list[str] | tuple[str, ...] | None):
    """`model` wrapped by peft: its own weights frozen, adapters on the target modules trainable."""
    from peft import get_peft_model

    model_type = getattr(model.config, "model_type", "?")
    try:
        wrapped = get_peft_model(model, lora_config(r, alpha, dropout, targets))
    except ValueError:
        if targets:
            raise LoraTargetsNotFound(
                f"spec.training.lora.targetModules {list(targets)} names no module of the base model "
                f"(model type {model_type!r}): name its linear layers, or use all-linear") from None
        raise LoraTargetsNotFound(
            f"peft has no default LoRA target modules for the model type {model_type!r}: set "
            "spec.training.lora.targetModules (the names of its attention projections, or all-linear)") from None
    trainable, total = wrapped.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters trainable (%.2f%%)", r, alpha,
             ", ".join(adapted_modules(wrapped)), trainable, total, 100 * trainable / total)
    return wrapped


def adapted_modules(wrapped) -> list[str]:
    """The kinds of module that got adapters (c_attn; q_proj, v_proj; ...): peft resolves all-linear to every
    layer's full module names, one per layer."""
    return sorted({name.rsplit(".", 1)[-1] for name in wrapped.peft_config["default"].target_modules})


def base_with_adapter(adapter_dir: Path, source: str, revision: str):
    """The base model loaded afresh on CPU in one piece, with the adapter in `adapter_dir` merged into its weights.
    No DeepSpeed config may be active: after ZeRO-3, from_pretrained would load the weights partitioned."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    base = AutoModelForCausalLM.from_pretrained(source, revision=revision, trust_remote_code=False)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge_into_final(final_dir: Path, source: str, revision: str) -> None:
    """Replaces the adapter that `save_model` wrote in `final_dir` with the merged model, so the directory holds
    what a full fine-tune's does (model.safetensors, config.json) and loads without peft."""
    merged = base_with_adapter(final_dir, source, revision)
    for name in ADAPTER_FILES:
        (final_dir / name).unlink()
    merged.save_pretrained(final_dir)


def name_the_base(final_dir: Path, model_name: str, revision: str) -> None:
    """The published adapter names its base as its users load it: the spec's model name (a Hub id), not the
    directory the stage loaded the base from (an s3:// base was downloaded to a temporary one)."""
    path = final_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = model_name
    config["revision"] = None if revision == "main" or model_name.startswith("s3://") else revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def describe(r: int, alpha: int, dropout: float, targets: list[str] | tuple[str, ...] | None) -> str:
    """The LoRA settings in one line, for training.json and the model card."""
    modules = ", ".join(targets) if targets else "the architecture's default"
    return f"r {r}, alpha {alpha}, dropout {dropout}, target modules {modules}"
