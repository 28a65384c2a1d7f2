"""What gets trained: backbones that take a norm factory, the classifier, the data modules."""

from models.backbones import FCN1d, ResNet1d, DigitsCNN
from models.classifier import Classifier
from models.data import DigitsDataModule, UCRDataModule, UCR_DATASETS

__all__ = [
    "DigitsCNN",
    "FCN1d",
    "ResNet1d",
    "Classifier",
    "DigitsDataModule",
    "UCRDataModule",
    "UCR_DATASETS",
]
