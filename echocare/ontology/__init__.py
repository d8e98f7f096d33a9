"""The anatomy ontology: the region -> organ -> structure tree and its tensor helpers."""

from .ontology import DEFAULT_ONTOLOGY_PATH, AnatomyOntology, UnknownAnatomyError, load_ontology, normalize_path

__all__ = ["AnatomyOntology", "UnknownAnatomyError", "load_ontology", "normalize_path", "DEFAULT_ONTOLOGY_PATH"]
