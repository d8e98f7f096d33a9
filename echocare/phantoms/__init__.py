"""Synthetic ultrasound for every task: the embedded default data of the demo and the tests."""

from echocare.phantoms.renderer import PRETRAIN_ANATOMIES, generate_demo_data, make_phantom_image

__all__ = ["PRETRAIN_ANATOMIES", "generate_demo_data", "make_phantom_image"]
