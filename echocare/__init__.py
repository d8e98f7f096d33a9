"""EchoCare: an open ultrasound foundation model and the MONAI toolkit around it."""

from echocare.bundle import as_bool, bundle_dir

__version__ = "0.1.0"
