"""Thin LightningModules that compose the zoo's parts into tasks."""

from lit_models.classification import Classifier, TextClassifier
from lit_models.vqa import VQA

__all__ = ["VQA", "Classifier", "TextClassifier"]
