"""Offline evaluation: BEIR datasets cut from the corpora, retrieval metrics and the harness that runs systems."""
