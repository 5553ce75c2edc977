#!/bin/bash
# Offline demo on the CPU: no GPU, no network. Builds a synthetic preference data set, a tokenizer
# trained on it and a small random OPT-architecture model, trains the reward model with DeepSpeed
# (fp32, ZeRO stage 0 by default), reports held-out accuracy, then scores two pairs with rw_eval.py
# and evaluates the held-out set in full (report.json and figures in OUTPUT/eval).
# Usage, from the repository root: bash training_scripts/cpu/run_demo.sh [OUTPUT] [ZERO_STAGE]
set -euo pipefail
OUTPUT=${1:-./output_cpu_demo}
ZERO_STAGE=${2:-0}
ASSETS=$OUTPUT/demo_assets
mkdir -p "$OUTPUT"

python training_scripts/cpu/prepare_demo.py "$ASSETS" --hidden 128 --train_pairs 6000 --eval_pairs 300

deepspeed --num_gpus 1 step2_reward_model/main.py \
   --model_name_or_path "$ASSETS/base_model" \
   --data_path "$ASSETS/data" \
   --data_split 0,1,0 \
   --data_output_path "$OUTPUT/data_cache" \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 128 \
   --learning_rate 1e-3 \
   --weight_decay 0.1 \
   --num_train_epochs 8 \
   --num_warmup_steps 20 \
   --eval_iters 1000 \
   --dtype fp32 \
   --zero_stage "$ZERO_STAGE" \
   --seed 1234 \
   --deepspeed \
   --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"

grep "final held-out accuracy" "$OUTPUT/training.log"

python rw_eval.py --model_path "$OUTPUT" \
   --prompt $'\n\nHuman: What is 3 plus 4?\n\nAssistant:' \
   --chosen " 3 plus 4 is 7." --rejected " 3 plus 4 is 9."
python rw_eval.py --model_path "$OUTPUT" \
   --prompt $'\n\nHuman: How do I boil an egg?\n\nAssistant:' \
   --chosen " Gladly, here you go. Put it in hot water for ten minutes." \
   --rejected " Whatever, not my problem. Put it in hot water for ten minutes."
python rw_eval.py --model_path "$OUTPUT" --data_path "$ASSETS/data" --data_split 0,1,0 \
   --data_output_path "$OUTPUT/data_cache" --report "$OUTPUT/eval/report.json" --plots "$OUTPUT/eval"
