"""Applying a symbol's command log to its book: the matcher's service layer (one writer per book)."""
