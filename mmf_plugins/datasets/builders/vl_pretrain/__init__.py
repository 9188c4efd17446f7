"""Vision-language pretraining corpora (image-caption pairs; SOHO ITM and OSCAR+ contrastive triples)."""
