"""The file MLflow runs to build the logged model (MLflow's models from code; no pickle)."""

from mlflow.models import set_model

from pipeline.serving.image_model import ImageModel

set_model(ImageModel())
