"""``leanformer finetune``: sequence classification on labelled text with full fine-tuning, LoRA or NOBLE."""
