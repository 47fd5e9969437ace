"""Data: the World tokenizer, binidx files, magic_prime sampling, make_data, the demo corpus."""
