#!/bin/bash
# OPT-350m reward model on one GPU: DeepSpeed-Chat's single-GPU recipe on Dahoas/rm-static.
# Usage, from the repository root: bash training_scripts/opt/single_gpu/run_350m.sh [OUTPUT] [ZERO_STAGE] [extra flags...]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 step2_reward_model/main.py \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --gradient_accumulation_steps 4 \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" &> "$OUTPUT/training.log"
