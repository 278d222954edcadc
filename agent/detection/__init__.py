"""Particle detection, localisation and linking: live, offline and self-supervised."""
