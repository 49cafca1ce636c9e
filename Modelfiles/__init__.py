"""Ollama Modelfile TEMPLATE bases per chat family (package data)."""
