"""The model zoo: a model spec becomes a model with its preprocessing, class names and provenance.

zoo.py loads torchvision, timm and the embedded default (with local or random
weights); tiny.py holds the tiny built-in models of the tests and demos
(`atlas:NAME`), families.py one small model of every torchvision family (`atlas:zoo_NAME`);
preprocess.py what a loaded model carries with it.
"""

from atlas.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, Preprocess
from atlas.models import families  # registers the zoo's small models, atlas:zoo_NAME
from atlas.models.zoo import DEFAULT_MODEL, RANDOM, fit_state_dict, imagenet_classes, list_models, load, read_state_dict

__all__ = ["DEFAULT_MODEL", "families", "IMAGENET_MEAN", "IMAGENET_STD", "RANDOM", "LoadedModel", "Preprocess",
           "fit_state_dict", "imagenet_classes", "list_models", "load", "read_state_dict"]
