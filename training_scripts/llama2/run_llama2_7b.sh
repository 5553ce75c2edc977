#!/bin/bash
# Llama-2-7b reward model, full fine-tuning, ZeRO-3 with offload.
# Usage, from the repository root: bash training_scripts/llama2/run_llama2_7b.sh [OUTPUT] [ZERO_STAGE] [extra flags...]
OUTPUT=${1:-./output_step2_llama_7b_epoch1_lr9.65e-6}
ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"

deepspeed step2_reward_model/main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_padding_at_beginning 0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --offload \
   --dtype bf16 \
   --output_dir "$OUTPUT" \
   "${@:3}" &> "$OUTPUT/training.log"
