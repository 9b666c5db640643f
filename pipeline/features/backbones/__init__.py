"""Backbones: the registry of names, their builders, and the EfficientNet-Lite0 port."""
