"""Pretraining (``echocare_pretrain``): augmentation, network and loss, engine, metrics."""

from echocare.tasks.pretrain.augment import AnatomyLabeld, RandColorJitterd, RandGrayscaled, RandResizedCropd
from echocare.tasks.pretrain.metrics import AnatomyLevelAccuracy
from echocare.tasks.pretrain.engine import PretrainEvalIteration, PretrainIteration, mask_generator
from echocare.tasks.pretrain.network import EchoCarePretrainNet, PretrainLoss, expand_unit_mask, random_unit_mask, reconstruction_panel_tensors

__all__ = ["AnatomyLabeld", "AnatomyLevelAccuracy", "EchoCarePretrainNet", "PretrainEvalIteration", "PretrainIteration", "PretrainLoss", "RandColorJitterd", "RandGrayscaled", "RandResizedCropd", "expand_unit_mask", "mask_generator", "random_unit_mask", "reconstruction_panel_tensors"]
