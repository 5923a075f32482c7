"""Secrets, in two programs: `tmpfs` is what `harness serve` reads (files an init container or
Vault's agent rendered into an in-memory volume) and how it keeps them from the engine;
`vault` is `harness secrets fetch`, the init container that writes them. Nothing is imported
here, so `harness secrets fetch` pays for neither pydantic nor the rest of the config."""
