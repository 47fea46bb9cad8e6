"""Graph passes, one module per pass, in pipeline order (see DESIGN.md)."""
