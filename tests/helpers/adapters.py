"""Random LoRA adapters (and weights of realistic magnitude) saved for the serving tests."""

from __future__ import annotations

import copy

import torch

from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier


def random_adapter(backbone, seed, path, num_labels=2):
    peft = apply_method(build_classifier(copy.deepcopy(backbone), num_labels, seed=seed), "lora",
                        StudyConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(str(path), safe_serialization=True)
    return peft.eval()


def random_lora(backbone, path, seed, r=8, alpha=16.0, targets=("q_proj", "v_proj"),
                num_labels=2):
    """A PEFT LoRA classifier of rank ``r`` on ``targets`` with random non-zero factors and
    head (N(0, 0.3): far from the zero-B initialisation, so each adapter answers its own way),
    saved to ``path`` (safetensors); returns ``path``. The serving unit tests' adapters."""
    from peft import LoraConfig, get_peft_model

    from loralens.models.classifier import CausalLMClassifier

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                     modules_to_save=["score"], bias="none")
    peft = get_peft_model(CausalLMClassifier(copy.deepcopy(backbone), num_labels), cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(str(path), safe_serialization=True)
    return path


def randomize_lora(peft, seed):
    """Realistic magnitudes: A as PEFT initialises it (kaiming-uniform), B and head small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_A" in n:
                bound = 1 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return peft.eval()
