"""Detectors, the training engine and the inference engine."""
