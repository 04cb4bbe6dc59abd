"""The demo's four toy tasks, their seeded examples, and the base model's generic pre-training data.

The inputs look different on purpose (``add:``, ``rev:``, ``up:``, ``cnt:``), so the classifier can
route on the text alone. Every draw comes from a ``random.Random`` seeded by a string, so the same seed
always gives the same examples; the order of the draws is part of the demo's recorded weights digest.
"""

from __future__ import annotations

import random
import string
from typing import Any

from ..data import TokenizedDataset, tokenize_example

TASKS = ("add", "rev", "up", "cnt")
ADD_MAX = 19
WORD_LENGTHS = (3, 5)
COUNT_LENGTHS = (3, 6)
COUNT_ALPHABET = "abc"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def vocab() -> list[str]:
    """The character-level vocabulary: the special tokens, then every character the tasks write."""
    return [*SPECIAL_TOKENS, *string.digits, *string.ascii_lowercase, *string.ascii_uppercase, *":+=- "]


def _word(rng: random.Random, alphabet: str, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(*lengths)))


def make_task_example(task: str, rng: random.Random) -> dict[str, str]:
    """One ``{"prompt", "completion", "expert"}`` example of ``task``, drawn from ``rng``."""
    if task == "add":
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
        return {"prompt": f"add:{a}+{b}=", "completion": str(a + b), "expert": task}
    if task == "rev":
        while True:  # a palindrome's answer would be its own copy
            word = _word(rng, string.ascii_uppercase, WORD_LENGTHS)
            if word != word[::-1]:
                return {"prompt": f"rev:{word}=", "completion": word[::-1], "expert": task}
    if task == "up":
        word = _word(rng, string.ascii_lowercase, WORD_LENGTHS)
        return {"prompt": f"up:{word}=", "completion": word.upper(), "expert": task}
    if task == "cnt":
        word = _word(rng, COUNT_ALPHABET, COUNT_LENGTHS)
        letter = rng.choice(COUNT_ALPHABET)
        return {"prompt": f"cnt:{word}:{letter}=", "completion": str(word.count(letter)), "expert": task}
    raise ValueError(f"Unknown demo task {task!r}; the tasks are {TASKS}.")


def make_task_examples(task: str, n: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` examples of ``task``; the same ``seed`` always gives the same examples."""
    rng = random.Random(f"{task}-{seed}")
    return [make_task_example(task, rng) for _ in range(n)]


def pretraining_data(tokenizer: Any, n: int, *, seed: int, max_length: int) -> TokenizedDataset:
    """The base model's generic data: copying random strings, and the task inputs with no answer.

    The inputs are plain text without a final EOS, so the model learns to read every format but is
    never shown what follows ``=``: it solves no task, and its hidden states keep the tasks apart.
    """
    rng = random.Random(f"generic-{seed}")
    alphabet = string.ascii_letters + string.digits
    features = []
    for i in range(n):
        if i % 2 == 0:
            text = _word(rng, alphabet, (2, 7))
            example, add_eos = {"prompt": f"cp:{text}=", "completion": text}, True
        else:
            task = TASKS[(i // 2) % len(TASKS)]
            example, add_eos = {"text": make_task_example(task, rng)["prompt"]}, False
        features.append(tokenize_example(example, tokenizer, max_length=max_length, add_eos=add_eos))
    return TokenizedDataset(features)


__all__ = ["TASKS", "make_task_example", "make_task_examples", "pretraining_data", "vocab"]
