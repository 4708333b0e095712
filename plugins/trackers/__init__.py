"""Experiment trackers as callbacks: TensorBoard, MLflow, Weights & Biases (sdk.tracking)."""
