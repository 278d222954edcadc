"""Trainers: they compose twins (through drivers), policies and detectors into training runs."""
