"""Integrations with training frameworks (HF Trainer)."""
