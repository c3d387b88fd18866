"""Turning chat messages into a prompt with the model's template, safely."""
