"""Training the classifier: data loading and masking, the plain loop, the routing loss, the Trainer path.

The mixture is a tiny Llama with two random LoRA experts. Domain k's sequences use their own range of
tokens and their targets are what expert k alone predicts there, so the LM loss can only fall by
routing domain k to expert k: a falling loss means the classifier learned to route.
"""

from __future__ import annotations

import json

import pytest
import torch
from factories import save_expert, tiny_llama
from peft import PeftModel

from xlora_hub import DataFormatError, XLoraConfig, XLoraModel
from xlora_hub.data import (
    IGNORE_INDEX,
    CompletionCollator,
    TokenizedDataset,
    answer_mask,
    load_examples,
    tokenize_dataset,
)
from xlora_hub.demo import build_tokenizer
from xlora_hub.training import (
    SaveMixtureCallback,
    XLoraTrainer,
    evaluate_loss,
    routing_report,
    train_classifier,
)

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
SEQ = 10
TOKENS_PER_DOMAIN = 8


def base_model(**overrides):
    return tiny_llama(initializer_range=0.25, **overrides)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-experts")
    return [
        save_expert(base_model, root / f"e{k}", target_modules=TARGETS, r=8, seed=200 + k, scale=0.3) for k in range(2)
    ]


def _domain(k: int, n: int, teacher, generator: torch.Generator) -> list[dict]:
    low = 8 + k * TOKENS_PER_DOMAIN
    ids = torch.randint(low, low + TOKENS_PER_DOMAIN, (n, SEQ), generator=generator)
    with torch.no_grad():
        predicted = teacher(input_ids=ids).logits.argmax(-1)
    features = []
    for row in range(n):
        labels = [IGNORE_INDEX] + predicted[row, :-1].tolist()  # position t is scored on labels[t + 1]
        features.append(
            {"input_ids": ids[row].tolist(), "labels": labels, "attention_mask": [1] * SEQ, "routing_label": k}
        )
    return features


@pytest.fixture(scope="module")
def routed_data(expert_dirs):
    """(train, held-out) TokenizedDatasets of both domains, targets from each domain's own expert."""
    generator = torch.Generator().manual_seed(0)
    train, held_out = [], []
    for k, folder in enumerate(expert_dirs):
        teacher = PeftModel.from_pretrained(base_model(), str(folder)).eval()
        train += _domain(k, 48, teacher, generator)
        held_out += _domain(k, 16, teacher, generator)
    names = ["e0", "e1"]
    return TokenizedDataset(train, label_names=names), TokenizedDataset(held_out, label_names=names)


def mixture(expert_dirs, **config) -> XLoraModel:
    torch.manual_seed(0)
    cfg = XLoraConfig(experts={f"e{k}": str(d) for k, d in enumerate(expert_dirs)}, **config)
    return XLoraModel.from_experts(base_model(), cfg)


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------- data
def test_prompt_completion_masks_the_prompt(tmp_path, char_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "up:ab=", "completion": "AB"}) + "\n" + json.dumps({"text": "cp:x=x"}) + "\n")
    data = tokenize_dataset(path, char_tokenizer, max_length=32)
    first, second = data[0], data[1]
    prompt = char_tokenizer("up:ab=")["input_ids"]
    completion = char_tokenizer("AB", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    assert first["input_ids"] == prompt + completion
    assert first["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    text = char_tokenizer("cp:x=x")["input_ids"] + [char_tokenizer.eos_token_id]
    assert second["input_ids"] == text and second["labels"] == text  # plain text: loss on every token

    batch = CompletionCollator.for_tokenizer(char_tokenizer)([first, second])
    assert batch["input_ids"].shape == (2, len(first["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * len(text) + [0] * (len(first["input_ids"]) - len(text))
    assert (batch["labels"][1, len(text) :] == IGNORE_INDEX).all()
    # The answer positions are the ones predicting the completion tokens.
    assert answer_mask(batch["labels"])[0].nonzero().flatten().tolist() == list(
        range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    )


def test_text_file_and_datasets_input(tmp_path, char_tokenizer):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "corpus.txt"
    path.write_text("add:1+2=3\nup:a=A\n")
    assert load_examples(path) == [{"text": "add:1+2=3"}, {"text": "up:a=A"}]
    dataset = datasets.Dataset.from_list([{"prompt": "rev:AB=", "completion": "BA", "expert": "rev"}])
    data = tokenize_dataset(dataset, char_tokenizer, max_length=16, label_names=["add", "rev"])
    assert data[0]["routing_label"] == 1
    assert data.has_routing_labels


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ('{"text": "a"}\n\n{"text": "b"}\n', 2, "empty line"),
        ('{"text": "a"}\n{"text": "b"}\n{"text": \n', 3, "not valid JSON"),
        ('{"text": "a"}\n["a list"]\n', 2, "expected a JSON object"),
    ],
)
def test_bad_jsonl_line_names_the_line(tmp_path, char_tokenizer, content, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl, line {line}: {what}"):
        tokenize_dataset(path, char_tokenizer, max_length=16)


def test_missing_field_and_bad_lengths(tmp_path, char_tokenizer):
    datasets = pytest.importorskip("datasets")
    no_text = datasets.Dataset.from_list([{"question": "what?", "answer": "that"}])
    with pytest.raises(DataFormatError, match=r"example 0: no `text` field .*question"):
        tokenize_dataset(no_text, char_tokenizer, max_length=16)
    with pytest.raises(DataFormatError, match="has `prompt` but no `completion`"):
        tokenize_dataset([{"prompt": "up:a="}], char_tokenizer, max_length=16)
    with pytest.raises(DataFormatError, match="max_length must be an integer of at least 2"):
        tokenize_dataset([{"text": "abc"}], char_tokenizer, max_length=1)
    with pytest.raises(DataFormatError, match="no token left to learn from"):
        tokenize_dataset([{"prompt": "up:abcdef=", "completion": "ABCDEF"}], char_tokenizer, max_length=5)
    with pytest.raises(DataFormatError, match="not an expert of the mixture"):
        tokenize_dataset([{"text": "ab", "expert": "math"}], char_tokenizer, max_length=8, label_names=["add"])
    with pytest.raises(DataFormatError, match="unsupported data file type '.csv'"):
        (tmp_path / "data.csv").write_text("text\nabc\n")
        tokenize_dataset(tmp_path / "data.csv", char_tokenizer, max_length=8)


# ---------------------------------------------------------------------------------------------- plain loop
def test_train_classifier_learns_to_route(expert_dirs, routed_data):
    train, held_out = routed_data
    model = mixture(expert_dirs)
    before = evaluate_loss(model, held_out, batch_size=32)
    frozen = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    result = train_classifier(
        model, train, epochs=12, lr=1e-2, batch_size=16, seed=0, eval_dataset=held_out, eval_every=24, progress=False
    )
    after = evaluate_loss(model, held_out, batch_size=32)
    assert result.steps == 12 * 6 and len(result.train_losses) == result.steps
    assert [step for step, _ in result.eval_losses] == [24, 48, 72]
    assert result.eval_losses[-1][1] == pytest.approx(after)
    assert after < 0.7 * before, (before, after)
    assert not model.training  # left in the mode it was in
    for name, param in model.model.named_parameters():  # only the classifier trained
        assert torch.equal(param, frozen[name]), name
    report = routing_report(model, held_out)
    assert report.accuracy >= 0.9, report.format()


def test_train_classifier_is_seeded(expert_dirs, routed_data):
    train, _ = routed_data
    runs = []
    for _ in range(2):
        model = mixture(expert_dirs)
        train_classifier(model, train, epochs=2, lr=5e-3, batch_size=16, seed=3, progress=False)
        runs.append(model.classifier.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_routing_loss_supervises_the_classifier(expert_dirs, routed_data):
    train, held_out = routed_data
    model = mixture(expert_dirs)
    untrained = routing_report(model, held_out)
    result = train_classifier(
        model,
        train,
        epochs=8,
        lr=3e-2,
        batch_size=16,
        routing_loss_weight=1.0,
        routing_loss_tokens="all",
        progress=False,
    )
    assert result.routing_losses[-1] < 0.5 * result.routing_losses[0]
    report = routing_report(model, held_out)
    print("\n" + report.format())
    assert report.accuracy == 1.0 and untrained.accuracy < 1.0
    for k, name in enumerate(report.expert_names):
        assert report.mean_scalings[name][k] > 0.8, report.format()


def test_train_classifier_bad_options(expert_dirs, routed_data, char_tokenizer):
    model = mixture(expert_dirs)
    unlabelled = [{"text": "up:ab=AB"}]
    with pytest.raises(DataFormatError, match="no training example has an `expert` field"):
        train_classifier(model, unlabelled, tokenizer=char_tokenizer, routing_loss_weight=1.0, progress=False)
    with pytest.raises(DataFormatError, match="max_length must be an integer of at least 2"):
        train_classifier(model, unlabelled, tokenizer=char_tokenizer, max_length=1, progress=False)
    with pytest.raises(ValueError, match="routing_loss_tokens"):
        train_classifier(model, routed_data[0], routing_loss_weight=1.0, routing_loss_tokens="some", progress=False)


# ---------------------------------------------------------------------------------------------- transformers.Trainer
def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        max_steps=60,
        save_strategy="steps",
        save_steps=60,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _logits(model, data) -> torch.Tensor:
    batch = CompletionCollator(pad_token_id=0)(list(data))
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_trainer_with_save_callback_saves_a_reloadable_mixture(tmp_path, expert_dirs, routed_data):
    import datasets
    from transformers import Trainer

    train, held_out = routed_data
    model = mixture(expert_dirs)
    before = evaluate_loss(model, held_out)
    # A plain Trainer with its defaults (remove_unused_columns=True) on a datasets.Dataset: it keeps the columns
    # XLoraModel.forward names (input_ids, attention_mask, labels), drops the rest, and scores the eval loss.
    as_dataset = lambda data: datasets.Dataset.from_list([data[i] for i in range(len(data))])  # noqa: E731
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=as_dataset(train),
        eval_dataset=as_dataset(held_out),
        data_collator=CompletionCollator(pad_token_id=0),
        callbacks=[SaveMixtureCallback()],
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    model.eval()
    assert evaluate_loss(model, held_out) < 0.8 * before
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evaluate_loss(model, held_out), rel=1e-4)
    checkpoint = tmp_path / "run" / "checkpoint-60"
    assert (checkpoint / "xlora_config.json").is_file() and (checkpoint / "xlora_classifier.safetensors").is_file()
    reloaded = XLoraModel.from_pretrained(checkpoint, base_model=base_model())
    torch.testing.assert_close(_logits(reloaded, held_out), _logits(model, held_out), rtol=0, atol=1e-6)


def test_xlora_trainer_routing_loss_save_and_resume(tmp_path, expert_dirs, routed_data):
    train, held_out = routed_data
    # Tied embeddings: a plain Trainer's state-dict save refuses shared tensors; XLoraTrainer saves the mixture.
    tied = lambda: base_model(tie_word_embeddings=True)  # noqa: E731
    torch.manual_seed(0)
    cfg = XLoraConfig(experts={f"e{k}": str(d) for k, d in enumerate(expert_dirs)})
    model = XLoraModel.from_experts(tied(), cfg)
    trainer = XLoraTrainer(
        model=model,
        args=_args(tmp_path, max_steps=40, save_steps=20, learning_rate=2e-2),
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=CompletionCollator(pad_token_id=0, keep_routing_labels=True),
        routing_loss_weight=1.0,
    )
    trainer.train()
    assert routing_report(model, held_out).accuracy >= 0.9
    assert "eval_loss" in trainer.evaluate()
    final = tmp_path / "final"
    trainer.save_model(str(final))
    reloaded = XLoraModel.from_pretrained(final, base_model=tied())
    model.eval()
    torch.testing.assert_close(_logits(reloaded, held_out), _logits(model, held_out), rtol=0, atol=1e-6)

    # Resuming from the step-20 checkpoint restores the classifier (the only trainable tensors) and goes on to 40.
    torch.manual_seed(1)
    resumed = XLoraModel.from_experts(tied(), cfg)
    again = XLoraTrainer(
        model=resumed,
        args=_args(tmp_path, max_steps=40, save_steps=20, learning_rate=2e-2, output_dir=str(tmp_path / "resumed")),
        train_dataset=train,
        data_collator=CompletionCollator(pad_token_id=0, keep_routing_labels=True),
        routing_loss_weight=1.0,
    )
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-20"))
    assert again.state.global_step == 40
    resumed.eval()
    torch.testing.assert_close(_logits(resumed, held_out), _logits(model, held_out), rtol=0, atol=1e-5)


def test_train_classifier_takes_the_field_names_as_one_value(expert_dirs, char_tokenizer):
    from xlora_hub.data import Fields

    renamed = [{"q": f"up:{w}=", "a": w.upper(), "who": f"e{k % 2}"} for k, w in enumerate(["ab", "cd", "ef", "gh"])]
    options = dict(tokenizer=char_tokenizer, epochs=2, lr=1e-2, batch_size=2, routing_loss_weight=1.0, progress=False)
    runs = []
    model = mixture(expert_dirs)
    runs.append(
        (train_classifier(model, renamed, fields=Fields(prompt="q", completion="a", label="who"), **options), model)
    )
    model = mixture(expert_dirs)
    with pytest.warns(DeprecationWarning, match=r"fields=xlora_hub\.data\.Fields"):  # the CLI's spelling still works
        legacy = train_classifier(model, renamed, prompt_field="q", completion_field="a", label_field="who", **options)
    runs.append((legacy, model))
    (first, first_model), (second, second_model) = runs
    assert first.steps == 4 and first.train_losses == second.train_losses and len(first.routing_losses) == 4
    assert all(
        torch.equal(v, second_model.classifier.state_dict()[k]) for k, v in first_model.classifier.state_dict().items()
    )
    with pytest.raises(DataFormatError, match="no `text` field and no `prompt`/`completion` fields"):
        train_classifier(mixture(expert_dirs), renamed, **options)  # the default names do not read these examples
    with pytest.raises(ValueError, match="either as fields=Fields"):
        train_classifier(mixture(expert_dirs), renamed, fields=Fields(prompt="q"), prompt_field="q", **options)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['prompt_fields'\\]"):
        train_classifier(mixture(expert_dirs), renamed, prompt_fields="q", **options)
