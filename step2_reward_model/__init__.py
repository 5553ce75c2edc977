"""Step 2 of RLHF: reward-model training on DeepSpeed."""
