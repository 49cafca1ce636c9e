"""Shipped recipes (package data)."""
