"""Sanity checks of attribution methods: model-parameter randomization, the logit test, and
deletion / insertion curves against a random-order control (sanity.py), built on pixel ablation
(ablation.py) and map similarity (similarity.py)."""
