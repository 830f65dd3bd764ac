"""splitlora: split federated fine-tuning of Hugging Face causal LMs with LoRA."""

__version__ = "0.1.0"
