"""Feedback on turns (issue 20): a thumbs up or down on an assistant's turn, and its export."""
