"""Concepts: masks, concept keys and context, key-match heatmaps, and manipulations of images and features."""
