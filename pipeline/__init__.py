"""Train and compare Keras CNNs: DVC stages, MLflow tracking and registry."""
