"""ResNet with LARS, LAMB or SGD on any `tf.distribute` strategy.

Entry points (`python -m tpu_scripts.resnet.<name> --help`):

- `train`: trains a ResNet-50 (v1.5 or v1) on ImageNet TFRecords, TFDS or
  synthetic data, or a small ResNet on CIFAR / Fashion-MNIST, with
  `--optimizer`, `--recipe` and any `--strategy`.
- `sweep_batch_size`: the scaled-down reproduction, Fashion-MNIST test
  accuracy against batch size for four optimizers with the same tuning
  budget.

Libraries:

- `data`: the input contract (static, resumable, per-replica batches) and
  its TFDS, in-memory and Fashion-MNIST IDX inputs.
- `imagenet_tfrecords`: ImageNet TFRecord shards with MLPerf's
  preprocessing, and synthetic ImageNet-shaped data for throughput.
- `models`: ResNet-50 v1.5 (keras-hub), v1 (keras.applications) and a small
  CIFAR-style ResNet.
"""
