"""BERT pre-training with LAMB and SQuAD fine-tuning on any strategy.

Entry points (`python -m tpu_scripts.bert.<name> --help`):

- `create_pretraining_data`: text files -> WordPiece vocabulary ->
  masked-LM/NSP TFRecords (google-research/bert's features).
- `pretrain`: pre-trains BERT (the LAMB paper's recipes, gradient
  accumulation, two phases); the module is also the pre-training library
  the other scripts import (optimizers, the task, `run`).
- `finetune_squad`: fine-tunes a pre-trained BERT on SQuAD v1.1 and reports
  exact match and F1.
- `sweep_batch_size`: the scaled-down LAMB-vs-AdamW batch-size sweep on a
  CPU.

Libraries:

- `data`: WordPiece, record creation and the input pipelines.
- `models`: BERT configs and keras-hub models with the pre-training and span
  heads.
- `squad`: SQuAD examples, features, answers and the official metric.
"""
