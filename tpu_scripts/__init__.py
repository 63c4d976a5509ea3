"""Large-batch training scripts for keras_lamb: strategy plumbing, one
strategy-agnostic trainer, input pipelines, models and the scripts that use
them (ResNet with LARS/LAMB; the BERT scripts reuse the same trainer).

TensorFlow-specific code (tf.distribute, tf.data) lives here, never in
`keras_lamb`. The scripts need the TensorFlow backend of Keras.
"""
