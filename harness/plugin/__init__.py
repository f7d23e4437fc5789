"""The method-plugin contract: what a method implements (:class:`Method`, its :class:`MethodConfig`,
its :class:`Stage` s) and what the harness hands it (:class:`StageContext`); ``METHODS``, the registry.

This is the face ``methods/`` is written against, together with the building blocks of
:mod:`harness.modeling`, :mod:`harness.data`, :mod:`harness.config` and :mod:`harness.core`.
"""
from harness.plugin.method import METHODS, Method, MethodConfig, Stage, StageContext

__all__ = ["METHODS", "Method", "MethodConfig", "Stage", "StageContext"]
