"""The vLLM engine: its command line and environment (pure), and its process (I/O)."""
