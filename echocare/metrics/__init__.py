"""Task metrics that MONAI and Ignite lack."""

from echocare.metrics.pretrain import AnatomyLevelAccuracy, MeanOfOutput
