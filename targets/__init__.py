"""Target specs: the TOML schema and loader, the built-in specs, the lowering backends."""
