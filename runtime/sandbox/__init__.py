"""Sandboxing of the engine, applied in a small single-threaded stage-2 process before exec."""
