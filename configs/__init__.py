"""Training configurations: `default.py` documents every field; each other file is one setup."""
