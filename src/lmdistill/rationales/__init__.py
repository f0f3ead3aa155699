"""Saliency rationales (Ballout et al. 2024, arXiv 2409.12586): task data, teacher attributions, rationale words."""
