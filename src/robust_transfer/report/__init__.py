"""Figures and summary pages made from results tables (never from training)."""
