"""VQA v2 (Goyal et al. 2017): official question/annotation json files."""
