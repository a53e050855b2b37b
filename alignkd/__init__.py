"""alignkd: offline Align-KD distillation of vision-language models from a teacher cache."""

__version__ = "0.1.0"
