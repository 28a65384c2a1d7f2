"""What gets trained: backbones that take a norm factory, the classifier, the data modules."""

from models.backbones import DigitsCNN, FCN1d, ResNet1d
from models.classifier import Classifier
from models.data import UCR_DATASETS, DigitsDataModule, UCRDataModule

__all__ = [
    "DigitsCNN",
    "FCN1d",
    "ResNet1d",
    "Classifier",
    "DigitsDataModule",
    "UCRDataModule",
    "UCR_DATASETS",
]
