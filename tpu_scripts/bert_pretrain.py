r"""Pre-trains BERT (masked LM + next sentence) with LAMB on any strategy.

The LAMB paper's BERT-Large run on a TPU pod, phase 1 (batch 65,536, sequence
128) and phase 2 (batch 32,768, sequence 512, re-warmed from phase 1):

    python -m tpu_scripts.bert_pretrain --strategy=tpu --tpu=my-pod \
      --input_files='gs://my-bucket/bert/seq128/*.tfrecord' \
      --vocab_file=gs://my-bucket/bert/vocab.txt --bert_config=large \
      --recipe=lamb_64k_32k --phase=1 --mixed_precision=bfloat16 \
      --steps_per_loop=200 --model_dir=gs://my-bucket/bert/phase1
    python -m tpu_scripts.bert_pretrain --strategy=tpu --tpu=my-pod \
      --input_files='gs://my-bucket/bert/seq512/*.tfrecord' \
      --vocab_file=gs://my-bucket/bert/vocab.txt --bert_config=large \
      --recipe=lamb_64k_32k --phase=2 --mixed_precision=bfloat16 \
      --init_checkpoint=gs://my-bucket/bert/phase1 \
      --steps_per_loop=100 --model_dir=gs://my-bucket/bert/phase2

A tiny run on one CPU machine, emulating batch 1024 with 8 steps of 128:

    python tpu_scripts/bert_pretrain.py --input_files='/tmp/bert/*.tfrecord' \
      --vocab_file=/tmp/bert/vocab.txt --bert_config=tiny \
      --max_seq_length=64 --max_predictions_per_seq=10 --recipe=lamb_paper \
      --global_batch_size=1024 --gradient_accumulation_steps=8 \
      --train_steps=50 --in_memory --model_dir=/tmp/bert/run

Checkpoints, TensorBoard logs (loss, MLM and NSP accuracy and loss, learning
rate, per-variable trust ratios) and `results.json` go to `--model_dir`; a
run restarted with the same `--model_dir` resumes from its last checkpoint.
The logic lives in `tpu_scripts.bert_pretraining`.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

from absl import app, flags, logging  # noqa: E402

from tpu_scripts import bert_pretraining  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from tpu_scripts import run_state

    run_state.exit_on_flag_error(bert_pretraining.run, flags.FLAGS)


if __name__ == "__main__":
    bert_pretraining.define_flags()
    flags.adopt_module_key_flags(bert_pretraining)  # listed by --help
    app.run(main)
