"""Triton kernels and their plain-torch references (kernels/reference.py)."""
