"""EchoCare: an open ultrasound foundation model and the MONAI toolkit around it."""

__version__ = "0.1.0"
