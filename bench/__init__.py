"""attnbench: benchmark attention mechanisms fairly and reproducibly."""

__version__ = "0.1.0"
