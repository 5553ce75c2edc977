"""Shared by the RLHF steps: data, DeepSpeed configuration, small helpers."""
