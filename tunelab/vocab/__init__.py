"""Vocabulary expansion (`tunelab vocab extend`): new BPE tokens learnt from in-domain text, added to a base model's
tokenizer after its own (old ids unchanged), with embedding rows initialised from the pieces they replace."""
