"""Evaluation harnesses that report accuracy, dollars and seconds."""
