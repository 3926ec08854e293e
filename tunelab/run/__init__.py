"""`tunelab run`: the whole loop from one experiment file — prompts, teacher data, fine-tuning, eval against
the best prompt, serve — with cached stages, one run folder and one HTML report (see docs/run.md)."""
