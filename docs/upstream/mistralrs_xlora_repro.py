"""Reproductions for docs/upstream/mistralrs-xlora-bugs.md, made of files xlora-hub exports.

1. ``python mistralrs_xlora_repro.py build DIR`` (needs ``xlora-hub``, i.e. torch, transformers, peft): a seeded
   2-layer Mistral (hidden 32) with a character tokenizer, its Llama twin (the same weights under
   ``model_type: llama``), two LoRA experts on the projections, an X-LoRA mixture, exported by
   ``xlora-hub convert --to mistralrs`` for each base (``DIR/rs-mistral``, ``DIR/rs-llama``), and xlora-hub's
   greedy next tokens in ``DIR/expected.json``.
2. ``python mistralrs_xlora_repro.py run DIR --arch Mistral|Llama`` (needs only ``mistralrs``): loads the export in
   mistral.rs and prints, per prompt, mistral.rs' greedy next token and xlora-hub's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROMPTS = ["a", "q", "ab", "hello", "the cat"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(root: Path) -> None:
    """Write both bases, the experts, the mixture, both exports and xlora-hub's next tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from xlora_hub import XLoraConfig, XLoraModel

    vocab = ["<unk>", "<pad>", "<bos>", "<eos>", *"abcdefghijklmnopqrstuvwxyz0123456789 .,:=+-"]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    config = MistralConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False,
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    base = MistralForCausalLM(config)
    with torch.no_grad():
        for param in base.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    folder = root / "base-mistral"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["rope_theta"] = data["rope_parameters"]["rope_theta"]  # mistral.rs needs it at the top level
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    data = json.loads((folder / "tokenizer_config.json").read_text())
    data["chat_template"] = template  # writes the prompt as it is
    (folder / "tokenizer_config.json").write_text(json.dumps(data, indent=2))
    twin = root / "base-llama"  # the same weights and names as a Llama
    shutil.copytree(folder, twin)
    data = json.loads((twin / "config.json").read_text())
    data.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
    data.pop("sliding_window")
    (twin / "config.json").write_text(json.dumps(data, indent=2))

    experts = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        peft_model = get_peft_model(
            MistralForCausalLM.from_pretrained(folder),
            LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=0.0),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        peft_model.save_pretrained(str(root / name))
        experts[name] = str(root / name)
    model = XLoraModel.from_experts(MistralForCausalLM.from_pretrained(folder), XLoraConfig(experts=experts))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    model.save_pretrained(root / "mix")
    for arch, base_folder in (("mistral", folder), ("llama", twin)):
        command = [sys.executable, "-m", "xlora_hub", "convert", str(root / "mix"), str(root / f"rs-{arch}")]
        command += ["--to", "mistralrs", "--base-model-id", str(base_folder.resolve()), "-q"]
        subprocess.run(command, check=True)
    expected = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            expected[prompt] = int(model(input_ids=ids).logits[0, -1].argmax())
    (root / "expected.json").write_text(json.dumps(expected, indent=2))


def run(root: Path, arch: str) -> None:
    """Load the export in mistral.rs and print its greedy next token beside xlora-hub's."""
    from mistralrs import Architecture, ChatCompletionRequest, ModelDType, Runner, Which

    os.environ.setdefault("MISTRALRS_CPU_KV_F32", "1")
    folder = root / f"rs-{arch.lower()}"
    base = json.loads((folder / "ordering.json").read_text())["base_model_id"]
    which = Which.XLora(
        xlora_model_id=str(folder), order=str(folder / "ordering.json"), model_id=base,
        arch=getattr(Architecture, arch), dtype=ModelDType.F32,
    )  # fmt: skip
    runner = Runner(which=which, token_source="none", max_seqs=1)
    expected = json.loads((root / "expected.json").read_text())
    for prompt in PROMPTS:
        request = ChatCompletionRequest(
            messages=[{"role": "user", "content": prompt}], model="xlora", max_tokens=1, temperature=0.0,
            logprobs=True, top_logprobs=1,
        )  # fmt: skip
        try:
            choice = runner.send_chat_completion_request(request).choices[0]
            got = choice.logprobs.content[0].top_logprobs[0].token
        except Exception as err:
            got = f"error: {str(err).splitlines()[0]}"
        print(f"{prompt!r:10} mistral.rs: {got}  xlora-hub: {expected[prompt]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--arch", choices=["Mistral", "Llama"], default="Mistral")
    args = parser.parse_args()
    build(args.folder) if args.command == "build" else run(args.folder, args.arch)


if __name__ == "__main__":
    main()
