"""The generated ``shapes`` demo corpus: scenes, task text, tokenizer and the file writer (``generator``)."""
