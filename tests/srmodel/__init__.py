"""Tests of the model (srmodel/): no Ray, tiny models."""
