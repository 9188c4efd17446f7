"""Image-text retrieval on COCO and Flickr30K (Karpathy splits)."""
