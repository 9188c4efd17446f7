"""RefCOCO+ (Yu et al. 2016) referring-expression grounding, in VL-BERT's flattened refs json."""
