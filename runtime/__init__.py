"""harness: the hardened launcher that serves vLLM behind an mTLS front."""

__version__ = "0.1.0"
