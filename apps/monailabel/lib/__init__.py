"""EchoCare's MONAI Label app: infer and train tasks that drive the project's bundles."""
