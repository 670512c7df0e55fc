"""Recipes that build the shipped assets: the glyph base, the face base and the feature extractors."""
