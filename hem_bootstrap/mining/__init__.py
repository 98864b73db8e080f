"""Matching detections to ground truth, mining strategies and the negative bank."""
