"""What the demo build is: its recipe (sizes and schedules), its version, its layout, its recorded digest."""

from __future__ import annotations

from dataclasses import dataclass

DEMO_VERSION = "v3"
"""Names the recipe below; bump it whenever the recipe changes, so an old cached build is never reused."""

REFERENCE_WEIGHTS_SHA256 = "5a5fd905a3deb6ee308a6d9e427248806f91730b5ef024900a1ea969978001db"
""":func:`~xlora_hub.demo.weights_digest` of the recorded default build (seed 0, :data:`RECIPE`): torch 2.13.0,
transformers 5.24, peft 0.21.2 on an Intel Xeon with AVX-512, default kernels. Another digest means other kernels or
library versions; such a build scores a little differently (within the margin the tests allow)."""

BASE_MODEL_DIR = "base_model"
EXPERTS_DIR = "experts"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The experts' LoRA targets: the Linear projections only. v2 also targeted ``embed_tokens``, which mistral.rs drops
(its X-LoRA builds LoRA on Linear layers only), so an export of v2 lost its experts; v3 exports faithfully."""


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and schedules of the build (what :data:`DEMO_VERSION` names)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    pretrain_examples: int = 8000
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    expert_examples: int = 3000
    expert_steps: int = 800
    expert_lr: float = 5e-3
    lora_r: int = 8
    lora_alpha: int = 16
    classifier_examples: int = 800
    classifier_epochs: int = 8
    classifier_lr: float = 1e-2
    routing_loss_weight: float = 5.0
    batch_size: int = 64
    max_length: int = 32


RECIPE = DemoRecipe()

SMALL_RECIPE = DemoRecipe(
    pretrain_examples=200,
    pretrain_steps=15,
    expert_examples=64,
    expert_steps=6,
    classifier_examples=16,
    classifier_epochs=1,
    batch_size=16,
)
"""A build of a few seconds with the demo's layout and file set but no quality: for tests and quick benchmark
runs that need a demo folder, not a demo that works."""

__all__ = [
    "BASE_MODEL_DIR",
    "DEMO_VERSION",
    "EXPERTS_DIR",
    "LORA_TARGETS",
    "RECIPE",
    "SMALL_RECIPE",
    "REFERENCE_WEIGHTS_SHA256",
    "DemoRecipe",
]
