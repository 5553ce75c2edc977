#!/bin/bash
# OPT-350m reward model across nodes. The deepspeed launcher reads the hosts from HOSTFILE
# (default /job/hostfile: one "hostname slots=N" line per node).
# Usage, from the repository root: bash training_scripts/opt/multi_node/run_350m.sh [OUTPUT] [ZERO_STAGE] [extra flags...]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
HOSTFILE=${HOSTFILE:-/job/hostfile}
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" step2_reward_model/main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
   --per_device_train_batch_size 2 \
   --per_device_eval_batch_size 2 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" &> "$OUTPUT/training.log"
