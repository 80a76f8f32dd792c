"""What users run on top of training: the demo, kind comparisons, figures and tables of
attention, and the Hugging Face export. Each module is a few library calls in order."""
