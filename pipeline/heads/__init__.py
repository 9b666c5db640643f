"""Classifier heads on cached features: the registry, transforms, the Keras head, fitting and metrics.

``KerasHead`` is re-exported here because run folders written by featcache 0.1 pickled it as
``pipeline.heads.KerasHead``.
"""

from pipeline.heads.keras_head import KerasHead

__all__ = ["KerasHead"]
