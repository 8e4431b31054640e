"""Lightning callbacks: the DFA engine and its diagnostics."""
from dfa_lightning.callbacks.alignment_monitor import AlignmentMonitor
from dfa_lightning.callbacks.feedback_alignment import FeedbackAlignmentStrategy

__all__ = ["AlignmentMonitor", "FeedbackAlignmentStrategy"]
