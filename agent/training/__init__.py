"""Trainers (`scopeloop train` kinds): they build twins' environments through the
driver side and fit what `policies/` then runs; policies themselves never train."""
