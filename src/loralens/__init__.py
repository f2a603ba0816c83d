"""loralens: controlled studies of parameter-efficient fine-tuning.

rank-8 LoRA vs full fine-tuning of a causal LM classifier: training, layer-wise
representation drift to the base model, statistics and serving cost.
"""

__version__ = "0.1.0"
