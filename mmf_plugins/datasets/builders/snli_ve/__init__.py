"""SNLI-VE: visual entailment (premise image, hypothesis sentence, 3 labels)."""
