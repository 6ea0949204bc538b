"""Attention mechanisms (registry.py, attention/<name>.py) and transformer models."""
