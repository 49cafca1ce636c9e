"""Built-in plugins of ollama-compress, one module per stage."""
