"""Pure renderers: verdicts in, text out. No pytest, no torch."""
