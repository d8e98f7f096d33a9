"""One package per task kind, each with its data, network, metrics and writers."""

