"""Recipes: the typed schema (sections, the whole recipe) and loading with --set."""
