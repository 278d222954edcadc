"""Optical tweezers from physics: exact Mie forces in a focused beam, their learned
surrogate, and phase holograms for many traps."""
