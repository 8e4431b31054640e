"""Lightning callbacks: the DFA engine and its diagnostics."""
from dfa_lightning.callbacks.alignment_monitor import AlignmentMonitor
from dfa_lightning.callbacks.feedback_alignment import FeedbackAlignmentStrategy
from dfa_lightning.callbacks.final_alignment import FinalAlignment
from dfa_lightning.callbacks.weight_transport import WeightTransportAudit

__all__ = ["AlignmentMonitor", "FeedbackAlignmentStrategy", "FinalAlignment", "WeightTransportAudit"]
