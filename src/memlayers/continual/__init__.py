"""Continual learning for memory models: slot statistics, sparse memory finetuning, memory patches."""
