"""Tiny models and peft experts built from configs with seeded random weights (nothing is downloaded)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()


def tiny_opt(seed: int = 0, **overrides) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return tf.OPTForCausalLM(tf.OPTConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return tf.GPT2LMHeadModel(tf.GPT2Config(**cfg)).eval()


def tiny_bert_classifier(seed: int = 0, **overrides) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=128,
    )
    cfg.update(overrides)
    return tf.BertForSequenceClassification(tf.BertConfig(**cfg)).eval()


def save_expert(
    factory: Callable[[], torch.nn.Module],
    path: str | Path,
    *,
    target_modules: list[str],
    r: int = 4,
    alpha: int = 8,
    seed: int = 0,
    scale: float = 0.2,
    zero_b: bool = False,
    **lora_kwargs,
) -> Path:
    """Save a peft LoRA adapter with random non-zero weights (B too, unless ``zero_b``)."""
    base = factory()
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, **lora_kwargs)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                if zero_b and ("lora_B" in name or "lora_embedding_B" in name):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(path))
    return Path(path)


def peft_reference(factory: Callable[[], torch.nn.Module], expert_dirs: list[Path], **xlora_kwargs):
    """peft's own XLoraModel over the same experts (named "0".."n-1", as peft requires)."""
    from peft import XLoraConfig as PeftXLoraConfig

    base = factory()
    base.config.use_cache = False
    config = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.get_text_config().hidden_size,
        adapters={str(i): str(d) for i, d in enumerate(expert_dirs)},
        **xlora_kwargs,
    )
    model = get_peft_model(base, config).eval()
    return model


def copy_classifier_from_peft(ours, peft_model) -> None:
    """Copy peft's classifier weights into ours in memory (peft's save_pretrained drops them)."""
    state = peft_model.base_model.internal_xlora_classifier.state_dict()
    ours.classifier.load_state_dict(copy.deepcopy(state))
