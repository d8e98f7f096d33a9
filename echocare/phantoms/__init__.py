"""Synthetic ultrasound for every task: the embedded default data of the demo and the tests."""

from echocare.phantoms.demo import TASKS, generate_demo_data
from echocare.phantoms.renderer import PRETRAIN_ANATOMIES, make_phantom_image

__all__ = ["PRETRAIN_ANATOMIES", "TASKS", "generate_demo_data", "make_phantom_image"]
