"""Train a mixture's classifier with ``transformers.Trainer``; runs as is under ``accelerate launch``.

    python examples/train_with_trainer.py ./mix --data train.jsonl --output ./mix-trained
    accelerate launch --num_processes 2 examples/train_with_trainer.py ./mix --data train.jsonl --output ./mix-trained

Each process loads the mixture (its experts from their own repos, the base model from the config's
reference), the Trainer wraps it for DDP (or FSDP / DeepSpeed, as ``accelerate config`` says), and
:class:`~xlora_hub.training.XLoraTrainer` writes every checkpoint as a loadable mixture. The final
mixture is saved to ``--output`` by the main process only.
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer, TrainingArguments

from xlora_hub import XLoraModel
from xlora_hub.data import CompletionCollator, tokenize_dataset
from xlora_hub.training import XLoraTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", help="mixture folder or Hub repo id")
    parser.add_argument("--data", required=True, help="training data (.jsonl: prompt/completion or text, .txt)")
    parser.add_argument("--eval-data", help="held-out data, scored at the end")
    parser.add_argument("--output", required=True, help="where the trained mixture goes")
    parser.add_argument("--tokenizer", help="tokenizer (default: the mixture's base model)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--routing-loss-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where an accelerator is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = XLoraModel.from_pretrained(args.mixture)
    base_ref = model.xlora_config.base_model
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or base_ref.repo_id, revision=base_ref.revision)
    use_routing = args.routing_loss_weight > 0
    names = model.expert_names if use_routing else None
    train = tokenize_dataset(args.data, tokenizer, max_length=args.max_length, label_names=names)
    held_out = tokenize_dataset(args.eval_data, tokenizer, max_length=args.max_length) if args.eval_data else None
    training_args = TrainingArguments(
        output_dir=f"{args.output}-checkpoints",
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        save_strategy="epoch",
        logging_steps=5,
        report_to=[],
        use_cpu=args.cpu,
        ddp_find_unused_parameters=False,
    )
    trainer = XLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=CompletionCollator.for_tokenizer(tokenizer, keep_routing_labels=use_routing),
        routing_loss_weight=args.routing_loss_weight,
    )
    result = trainer.train()
    summary = {
        "world_size": training_args.world_size,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": next((log["loss"] for log in trainer.state.log_history if "loss" in log), None),
    }
    if held_out is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
