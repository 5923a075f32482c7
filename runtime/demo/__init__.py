"""Demo assets: a tiny generated Llama, a demo PKI and a config, all under one folder."""
