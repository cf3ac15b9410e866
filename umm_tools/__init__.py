"""umm: Upcycle-and-Merge MoE reward models (UMM-RM)."""

__version__ = "0.1.0"
