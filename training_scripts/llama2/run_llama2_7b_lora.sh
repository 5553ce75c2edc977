#!/bin/bash
# Llama-2-7b reward model with LoRA (rank 128) on the decoder layers, merged into the saved
# weights: run_llama2_7b.sh's recipe plus the two LoRA flags.
# Usage, from the repository root: bash training_scripts/llama2/run_llama2_7b_lora.sh [OUTPUT] [ZERO_STAGE] [extra flags...]
OUTPUT=${1:-./output_step2_llama_7b_lora_epoch1_lr9.65e-6}
ZERO_STAGE=${2:-3}

bash "$(dirname "$0")/run_llama2_7b.sh" "$OUTPUT" "$ZERO_STAGE" --lora_dim 128 --lora_module_name "layers." "${@:3}"
