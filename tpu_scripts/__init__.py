"""Large-batch training scripts for keras_lamb, grouped by job.

- `demo.py`: the first thing to run (LARS/LAMB vs momentum/Adam on a
  dataset bundled with scikit-learn; prints a table and draws a PNG).
- `resnet/`: ResNet with LARS/LAMB/SGD on ImageNet, CIFAR or Fashion-MNIST
  (`resnet/train.py`) and the batch-size sweep.
- `bert/`: BERT pre-training with LAMB (`bert/pretrain.py`), SQuAD
  fine-tuning, data creation and the batch-size sweep.
- Shared by both: `distribute.py` (the strategy from a string, and the
  distribution flags every training script takes), `trainer.py` (one
  training loop for every strategy), `optimizers.py` (optimizers and
  schedules by name), `run_state.py` (safe restarts, atomic writes).

Naming: in `resnet/` and `bert/` a module named after a verb is an entry
point (`train.py`, `pretrain.py`, `finetune_squad.py`,
`create_pretraining_data.py`, `sweep_batch_size.py`); it runs as
`python -m tpu_scripts.<folder>.<module>` or as a file, and is importable
too (its flags, `run` and the logic worth testing). A module named after a
noun is a library (`data.py`, `models.py`, `squad.py`, ...).

TensorFlow-specific code (tf.distribute, tf.data) lives here, never in
`keras_lamb`. The scripts need the TensorFlow backend of Keras.
"""
