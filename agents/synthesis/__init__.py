"""Synthetic documents from the diffusion models, their quality filter, and query expansion."""
