"""COCO captioning (Karpathy splits; COCO captions json)."""
