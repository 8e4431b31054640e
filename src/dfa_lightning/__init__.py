"""dfa-lightning: train any PyTorch model with Direct Feedback Alignment or backprop from one YAML recipe."""
__version__ = "0.1.0"
