"""Bounded conversation memory for edge AI, served over MQTT."""

__version__ = "0.1.0"
