"""VCR (Zellers et al. 2019), question -> answer multiple choice with box-grounded words, as VL-BERT reads it."""
