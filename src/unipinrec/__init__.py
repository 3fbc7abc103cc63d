"""UniPinRec: one causal transformer for retrieval and ranking."""
__version__ = "0.1.0"
