"""Demo and experiment drivers: python -m experiments.<name> from the repository root."""
