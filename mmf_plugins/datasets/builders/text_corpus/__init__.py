"""Text-only MLM corpus (VL-BERT trains on text-only batches beside image-text ones)."""
