"""accel-tp: 2D-parallel (tensor x data) language-model training with Accelerate, DeepSpeed AutoTP and Ray Train."""

__version__ = "0.1.0"
