"""Distillation: the Align-KD losses (`losses`) and the trainer that reads the cache."""
