"""Weight integrity: model-dir policy and strict safetensors headers (pure), the walk and the
stat fingerprints that tie what was checked to what the engine loads (I/O in model_dir.py)."""
