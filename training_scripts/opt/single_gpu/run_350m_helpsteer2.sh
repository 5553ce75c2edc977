#!/bin/bash
# OPT-350m multi-attribute reward model on one GPU: regression on HelpSteer2's five attributes
# (helpfulness, correctness, coherence, complexity, verbosity, rated 0-4), all of its train split, its
# validation split held out; step 3 gets the reward NVIDIA recommends for HelpSteer2 models,
# 0.3 helpfulness + 0.74 correctness + 0.46 coherence + 0.47 complexity - 0.33 verbosity.
# Usage, from the repository root: bash training_scripts/opt/single_gpu/run_350m_helpsteer2.sh [OUTPUT] [ZERO_STAGE] [extra flags...]
OUTPUT=${1:-./output_helpsteer2}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 step2_reward_model/main.py \
   --model_name_or_path facebook/opt-350m \
   --data_path nvidia/HelpSteer2 \
   --data_split 0,1,0 \
   --objective regression \
   --attribute_weights helpsteer2 \
   --max_seq_len 2048 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --gradient_accumulation_steps 8 \
   --num_train_epochs 2 \
   --num_padding_at_beginning 1 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" &> "$OUTPUT/training.log"
